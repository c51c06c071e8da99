"""Stage 3, segmentation: a light head on the patch tokens (BatchNorm + 1×1 conv, the linear-probe head of
DINOv2), upsampled to the input resolution; everything trains, backbone at lr × 0.1."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.engine.loop import Batch, StageParts, StepOutput
from adala.eval import MeanIoU
from adala.models import build_vfm, model_spec, save_export
from adala.stages.common import backbone_and_head_groups, export_metadata, start_weights

FIELDS = ("image", "mask")
STREAM = "epoch"  # how it reads its training data: see adala.data.pipeline
IGNORE_INDEX = 255


class Segmenter(nn.Module):
    """A ViT backbone and a per-patch linear classifier; state-dict keys: ``backbone.*`` (timm's names under
    the prefix) and ``seg_head.*``, so the exported backbone loads into plain timm."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.seg_head = nn.Sequential(nn.BatchNorm2d(backbone.embed_dim), nn.Conv2d(backbone.embed_dim, num_classes, 1))

    def forward(self, batch: Batch) -> StepOutput:
        images = batch["image"]
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:]
        height, width = self.backbone.patch_embed.dynamic_feat_size(images.shape[-2:])
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
        # The grid covers the image padded to whole patches: upsample to that size, then drop the padding.
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        logits = F.interpolate(self.seg_head(grid), size=(height * patch_h, width * patch_w), mode="bilinear",
                               align_corners=False)[..., :images.shape[-2], :images.shape[-1]]
        return StepOutput(loss=F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX), prediction=logits)


def export_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys as timm names them, the head under ``seg_head.``."""
    return {key.removeprefix("backbone."): value for key, value in state.items()}


def build(cfg: Any, attention: dict[str, Any]) -> StageParts:
    backbone = build_vfm(model_spec(cfg.model), img_size=cfg.model.img_size, weights=start_weights(cfg),
                         attention=attention)

    def export(state: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
        metadata = export_metadata(cfg, backbone, num_seg_classes=cfg.data.num_seg_classes, **metadata)
        return save_export(export_state(state), path, metadata)

    return StageParts(
        model=Segmenter(backbone, cfg.data.num_seg_classes),
        param_groups=backbone_and_head_groups(("seg_head.",), cfg.stage.optim.backbone_lr_scale),
        export=export,
        metric=partial(MeanIoU, cfg.data.num_seg_classes, ignore_index=IGNORE_INDEX),
    )
