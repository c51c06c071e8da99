"""Stage 3, segmentation: a light head on the patch tokens (BatchNorm + 1×1 conv, the linear-probe head of
DINOv2), upsampled to the input resolution; everything trains, backbone at lr × 0.1."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from adala.engine.loop import Batch, StageParts
from adala.eval import MeanIoU
from adala.models import build_vfm, save_export
from adala.stages.common import backbone_and_head_groups, export_metadata, requested_attention, start_weights

FIELDS = ("image", "mask")
STREAM = "epoch"  # how it reads its training data: see adala.data.pipeline
IGNORE_INDEX = 255


class Segmenter(nn.Module):
    """A ViT backbone and a per-patch linear classifier; state-dict keys: timm's for the backbone,
    ``seg_head.*`` for the head, so the backbone part loads into plain timm."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.seg_head = nn.Sequential(nn.BatchNorm2d(backbone.embed_dim), nn.Conv2d(backbone.embed_dim, num_classes, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:]
        height, width = self.backbone.patch_embed.dynamic_feat_size(images.shape[-2:])
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
        return F.interpolate(self.seg_head(grid), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {**self.backbone.state_dict(), **{f"seg_head.{k}": v for k, v in self.seg_head.state_dict().items()}}


def build(cfg: Any) -> StageParts:
    backbone = build_vfm(
        cfg.model.name, img_size=cfg.model.img_size, weights=start_weights(cfg), attention=requested_attention(cfg)
    )
    model = Segmenter(backbone, cfg.data.num_seg_classes)

    def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=IGNORE_INDEX), {}

    @torch.no_grad()
    def evaluate(batches: Iterable[Batch]) -> dict[str, float]:
        model.eval()
        miou = MeanIoU(cfg.data.num_seg_classes, ignore_index=IGNORE_INDEX)
        for batch in batches:
            miou.update(model(batch["image"]), batch["mask"])
        return {"miou": miou.compute()}

    def export(path: Path) -> Path:
        metadata = export_metadata(cfg, backbone, num_seg_classes=cfg.data.num_seg_classes)
        return save_export(model.export_state(), path, metadata)

    return StageParts(
        model=model,
        param_groups=backbone_and_head_groups(model, ("seg_head.",), cfg.stage.optim.backbone_lr_scale),
        loss=loss,
        export=export,
        evaluate=evaluate,
    )
