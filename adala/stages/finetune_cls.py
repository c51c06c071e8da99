"""Stage 3, classification: a linear head on the (linearized) backbone; everything trains, backbone at lr × 0.1
(``stage.lora=R``: only rank-R adapters on the attention projections and the head train)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.engine.loop import Batch, StageParts, StepOutput
from adala.eval import Top1
from adala.models import build_vfm, model_spec, save_export
from adala.models.lora import add_lora, merge_lora
from adala.stages.common import backbone_and_head_groups, export_metadata, start_weights, strip_prefix

FIELDS = ("image", "label")
STREAM = "epoch"  # how it reads its training data: see adala.data.pipeline


class Classifier(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, batch: Batch) -> StepOutput:
        logits = self.vit(batch["image"])
        return StepOutput(loss=F.cross_entropy(logits.float(), batch["label"]), prediction=logits)


def build(cfg: Any, attention: dict[str, Any]) -> StageParts:
    vit = build_vfm(
        model_spec(cfg.model),
        img_size=cfg.model.img_size,
        weights=start_weights(cfg),
        num_classes=cfg.data.num_classes,
        attention=attention,
    )

    if cfg.stage.lora:  # LoLCATS' recipe: low-rank adapters on qkv and proj and the new head train
        add_lora(vit, cfg.stage.lora, cfg.stage.lora_alpha)
        vit.head.requires_grad_(True)

    def export(state: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
        metadata = export_metadata(cfg, vit, num_classes=cfg.data.num_classes, **metadata)
        return save_export(merge_lora(strip_prefix(state, "vit.")), path, metadata)

    return StageParts(
        model=Classifier(vit),
        param_groups=backbone_and_head_groups(("vit.head.",), cfg.stage.optim.backbone_lr_scale),
        export=export,
        metric=Top1,
    )
