"""Stage 2, feature alignment (paper Eq. 4): L = α · MSE(F_teacher, F_student) on the final token features.

The student is the linearized ViT (from the Stage-1 export, or the teacher's weights linearized directly) and
trains in full; the teacher is the original softmax ViT, frozen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adala.engine.loop import Batch, StageParts
from adala.models import build_vfm, get_vfm, save_export
from adala.stages.common import export_metadata, frozen_teacher, requested_attention, start_weights

FIELDS = ("image",)
STREAM = "resampled"  # how it reads its training data: see adala.data.pipeline


def build(cfg: Any) -> StageParts:
    teacher = frozen_teacher(cfg.model)
    student = build_vfm(
        cfg.model.name, img_size=cfg.model.img_size, weights=start_weights(cfg), attention=requested_attention(cfg)
    )
    alpha = cfg.stage.alpha if cfg.stage.alpha is not None else get_vfm(cfg.model.name).alpha

    def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            target = teacher.forward_features(batch["image"])
        features = student.forward_features(batch["image"])
        mse = F.mse_loss(features.float(), target.float())
        return alpha * mse, {"mse": mse.detach()}

    def export(path: Path) -> Path:
        return save_export(student.state_dict(), path, export_metadata(cfg, student))

    return StageParts(
        model=student,
        param_groups=[{"params": list(student.parameters()), "name": "student"}],
        loss=loss,
        export=export,
        frozen=[teacher],
    )
