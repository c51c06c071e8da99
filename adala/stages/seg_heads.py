"""Segmentation heads on a ViT's block outputs, and the multi-scale neck the Mask2Former head reads.

A head takes the patch-token maps ``[B, D, h, w]`` of the blocks it names (``blocks``, after the ViT's final
norm) and gives back what its ``scores`` turns into per-class scores at a given resolution and its ``loss`` scores
against a class mask. ``linear`` is DINOv2's linear probe (BatchNorm + 1×1 convolution on the last block);
``mask2former`` (:mod:`adala.stages.mask2former`) is the paper's head, fed by :class:`FeaturePyramid`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adala.errors import UserError

IGNORE_INDEX = 255
HEADS = ("linear", "mask2former")


def spread_blocks(depth: int, count: int = 4) -> list[int]:
    """``count`` blocks spread evenly over ``depth``, the last block last (24 blocks: 5, 11, 17, 23)."""
    return [max(0, depth * (i + 1) // count - 1) for i in range(count)]


class LinearHead(nn.Sequential):
    """BatchNorm + 1×1 convolution on the last block's tokens; cross-entropy on the upsampled logits."""

    def __init__(self, embed_dim: int, num_classes: int, depth: int) -> None:
        super().__init__(nn.BatchNorm2d(embed_dim), nn.Conv2d(embed_dim, num_classes, 1))
        self.blocks = [depth - 1]

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(maps[-1])

    def scores(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = self.scores(logits, tuple(mask.shape[-2:])).float()
        return F.cross_entropy(scores, mask, ignore_index=IGNORE_INDEX), {}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class FeaturePyramid(nn.Module):
    """Four maps at 4×, 2×, 1× and ½× the patch grid from four blocks' token maps: ViTDet's simple feature pyramid
    (two transposed convolutions, one, identity, a 2× max-pool), each level fed by its own block (shallow blocks
    for the fine levels, as BEiT's and MAE's segmentation necks do), then a 1×1 projection to ``channels``.

    Chosen over a ViT-Adapter because it stays outside the backbone: the ViT remains a plain timm model (its
    export loads into timm, strategies shard its blocks as usual, the linear attention is untouched) and the
    neck needs no compiled deformable-attention ops; the Mask2Former pixel decoder adds the cross-scale mixing.
    GroupNorm rather than BatchNorm: sliding-window crops and ranks never share batch statistics.
    """

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()

        def up(times: int) -> list[nn.Module]:
            layers: list[nn.Module] = []
            for i in range(times):
                layers.append(nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2))
                if i < times - 1:
                    layers += [_norm(embed_dim), nn.GELU()]
            return layers

        rescale = [up(2), up(1), [], [nn.MaxPool2d(2)]]
        self.levels = nn.ModuleList(
            nn.Sequential(*layers, nn.Conv2d(embed_dim, channels, 1), _norm(channels)) for layers in rescale)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.levels):
            raise ValueError(f"the feature pyramid takes {len(self.levels)} block outputs, got {len(maps)}")
        return [level(x) for level, x in zip(self.levels, maps)]


def head_metadata(kind: str, options: Any) -> dict[str, Any]:
    """What an export records of its segmentation head: the kind, and a Mask2Former head's sizes, so that it is
    rebuilt as it was trained (:func:`stored_options`)."""
    return {"seg_head": kind, **({"mask2former": dataclasses.asdict(options)} if kind == "mask2former" else {})}


def stored_options(meta: dict[str, Any], default: Any) -> Any:
    """The Mask2Former sizes an export recorded (:func:`head_metadata`), else ``default`` (exports written before
    the sizes were recorded)."""
    from adala.config import Mask2FormerOptions

    stored = meta.get("mask2former")
    return default if stored is None else Mask2FormerOptions(**stored)


def build_head(kind: str, *, embed_dim: int, depth: int, num_classes: int, options: Any) -> nn.Module:
    """The head ``kind`` (one of :data:`HEADS`) for a ViT ``embed_dim`` wide and ``depth`` blocks deep;
    ``options``: the stage's ``mask2former`` settings."""
    if kind == "linear":
        return LinearHead(embed_dim, num_classes, depth)
    if kind == "mask2former":
        from adala.stages.mask2former import Mask2FormerHead

        blocks = list(options.blocks) if options.blocks else spread_blocks(depth)
        if len(blocks) != 4 or not all(0 <= b < depth for b in blocks):
            raise UserError(f"stage.mask2former.blocks must name 4 of the model's {depth} blocks (0..{depth - 1}), "
                            f"fine to coarse; got {blocks}")
        return Mask2FormerHead(embed_dim, num_classes, blocks=blocks, hidden_dim=options.hidden_dim,
                               num_queries=options.num_queries, decoder_layers=options.decoder_layers,
                               encoder_layers=options.encoder_layers, feedforward=options.feedforward,
                               train_points=options.train_points)
    raise ValueError(f"unknown segmentation head {kind!r}")
