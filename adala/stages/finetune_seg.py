"""Stage 3, segmentation: a head (``stage.head``: ``linear`` or ``mask2former``, :mod:`adala.stages.seg_heads`) on
the ViT's block outputs; everything trains, the backbone at lr × 0.1 (``stage.lora=R``: only rank-R adapters on
the attention projections and the head train; the export has them merged).

Training reads crops; evaluation reads whole images and predicts them by sliding windows of ``stage.eval_crop``
at ``stage.eval_stride`` (:mod:`adala.eval.sliding_window`), scored at the mask's resolution.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adala.engine.loop import Batch, StageParts, StepOutput
from adala.errors import UserError, require_extra
from adala.eval import MeanIoU
from adala.eval.sliding_window import sliding_window
from adala.models import build_vfm, model_spec, save_export
from adala.models.lora import add_lora, merge_lora
from adala.stages.common import backbone_and_head_groups, export_metadata, start_weights
from adala.stages.seg_heads import HEADS, IGNORE_INDEX, LinearHead, build_head, head_metadata

FIELDS = ("image", "mask")
STREAM = "epoch"  # how it reads its training data: see adala.data.pipeline


class Segmenter(nn.Module):
    """A ViT backbone and a segmentation head; state-dict keys: ``backbone.*`` (timm's names under the prefix) and
    ``seg_head.*``, so the exported backbone loads into plain timm.

    ``window``: (crop, stride) of sliding-window evaluation; None: whole images in one forward. In evaluation the
    loss is not computed (zero) and the prediction is per-class scores at the mask's resolution.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: Optional[nn.Module] = None,
                 window: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.seg_head = head if head is not None else LinearHead(backbone.embed_dim, num_classes, len(backbone.blocks))
        self.window = window

    def forward(self, batch: Batch) -> StepOutput:
        images = batch["image"]
        if self.training:
            padded = self._padded_size(images)
            mask = F.pad(batch["mask"], (0, padded[1] - images.shape[-1], 0, padded[0] - images.shape[-2]),
                         value=IGNORE_INDEX)
            loss, scalars = self.seg_head.loss(self.seg_head(self._features(images)), mask)
            return StepOutput(loss=loss, scalars=scalars)
        if self.window is None:
            scores = self.predict(images)
        else:
            scores = sliding_window(self.predict, images, crop=self.window[0], stride=self.window[1])
        mask = batch.get("mask")
        if mask is not None and mask.shape[-2:] != scores.shape[-2:]:  # images resized for the model
            scores = F.interpolate(scores, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return StepOutput(loss=scores.new_zeros(()), prediction=scores)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Per-class scores ``[B, C, H, W]`` for ``images``."""
        # The grid covers the image padded to whole patches: scores at that size, then the padding dropped.
        scores = self.seg_head.scores(self.seg_head(self._features(images)), self._padded_size(images))
        return scores[..., :images.shape[-2], :images.shape[-1]]

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_intermediates(images, indices=self.seg_head.blocks, norm=True,
                                                   output_fmt="NCHW", intermediates_only=True)

    def _padded_size(self, images: torch.Tensor) -> tuple[int, int]:
        rows, cols = self.backbone.patch_embed.dynamic_feat_size(images.shape[-2:])
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        return rows * patch_h, cols * patch_w


def check(cfg: Any, attention: dict[str, Any]) -> None:
    """What validation checks for this stage: the head and the evaluation window."""
    stage = cfg.stage
    if stage.head not in HEADS:
        raise UserError(f"unknown stage.head {stage.head!r}; use one of {', '.join(HEADS)}")
    if stage.head == "mask2former":
        require_extra("transformers", "stage.head=mask2former")
        require_extra("scipy", "stage.head=mask2former")
        if stage.mask2former.hidden_dim <= 0 or stage.mask2former.hidden_dim % 32:
            raise UserError(f"stage.mask2former.hidden_dim must be a multiple of 32 (its GroupNorms and 8 attention "
                            f"heads), got {stage.mask2former.hidden_dim}")
    if stage.eval_batch_size is not None and stage.eval_batch_size <= 0:
        raise UserError(f"stage.eval_batch_size must be positive, got {stage.eval_batch_size}")
    crop, stride = window(cfg) or (1, 1)
    if crop < 0 or not 0 < stride <= crop:
        raise UserError(f"stage.eval_stride must be between 1 and the crop ({crop}), got {stride}")


def window(cfg: Any) -> Optional[tuple[int, int]]:
    """(crop, stride) of sliding-window evaluation, None for whole images (``stage.eval_crop=0``)."""
    crop = cfg.stage.eval_crop if cfg.stage.eval_crop is not None else cfg.model.img_size
    if not crop:
        return None
    return crop, cfg.stage.eval_stride or max(1, crop * 2 // 3)


def export_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys as timm names them (LoRA adapters merged into their weights), the head under ``seg_head.``."""
    return merge_lora({key.removeprefix("backbone."): value for key, value in state.items()})


def build(cfg: Any, attention: dict[str, Any]) -> StageParts:
    backbone = build_vfm(model_spec(cfg.model), img_size=cfg.model.img_size, weights=start_weights(cfg),
                         attention=attention)
    if cfg.stage.lora:  # LoLCATS' recipe: low-rank adapters on qkv and proj train; the new head trains in full
        add_lora(backbone, cfg.stage.lora, cfg.stage.lora_alpha)
    num_classes = cfg.data.num_seg_classes
    head = build_head(cfg.stage.head, embed_dim=backbone.embed_dim, depth=len(backbone.blocks), num_classes=num_classes,
                      options=cfg.stage.mask2former)

    def export(state: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
        metadata = export_metadata(cfg, backbone, num_seg_classes=num_classes,
                                   **head_metadata(cfg.stage.head, cfg.stage.mask2former), **metadata)
        return save_export(export_state(state), path, metadata)

    return StageParts(
        model=Segmenter(backbone, num_classes, head, window=window(cfg)),
        param_groups=backbone_and_head_groups(("seg_head.",), cfg.stage.optim.backbone_lr_scale),
        export=export,
        metric=partial(MeanIoU, num_classes, ignore_index=IGNORE_INDEX),
    )
