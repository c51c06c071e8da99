"""Stage 3, classification: a linear head on the (linearized) backbone; everything trains, backbone at lr × 0.1."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from adala.engine.loop import Batch, StageParts
from adala.eval import Top1
from adala.models import build_vfm, save_export
from adala.stages.common import backbone_and_head_groups, export_metadata, requested_attention, start_weights

FIELDS = ("image", "label")
STREAM = "epoch"  # how it reads its training data: see adala.data.pipeline


def build(cfg: Any) -> StageParts:
    model = build_vfm(
        cfg.model.name,
        img_size=cfg.model.img_size,
        weights=start_weights(cfg),
        num_classes=cfg.data.num_classes,
        attention=requested_attention(cfg),
    )

    def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(model(batch["image"]), batch["label"]), {}

    @torch.no_grad()
    def evaluate(batches: Iterable[Batch]) -> dict[str, float]:
        model.eval()
        top1 = Top1()
        for batch in batches:
            top1.update(model(batch["image"]), batch["label"])
        return {"top1": top1.compute()}

    def export(path: Path) -> Path:
        return save_export(model.state_dict(), path, export_metadata(cfg, model, num_classes=cfg.data.num_classes))

    return StageParts(
        model=model,
        param_groups=backbone_and_head_groups(model, ("head.",), cfg.stage.optim.backbone_lr_scale),
        loss=loss,
        export=export,
        evaluate=evaluate,
    )
