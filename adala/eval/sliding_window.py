"""Sliding-window inference (mmseg's ``slide`` mode): a whole image is cut into crops of the training size at a
stride, every crop is predicted, and the per-class scores are summed into the full image and divided by how many
crops covered each pixel.

All crops of a batch go through the model in one forward, so every rank makes the same number of forwards
whatever its images' sizes (sharded models, FSDP and ZeRO-3, need every rank in every forward).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Where the crops along one side of ``size`` pixels begin: every ``stride``, the last one moved back to end at
    the border; one crop at 0 when the side is no longer than ``crop``."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(count)})


def sliding_window(
    predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, crop: int, stride: int
) -> torch.Tensor:
    """Scores ``[B, C, H, W]`` for ``images [B, 3, H, W]`` from ``predict`` (``[N, 3, crop, crop]`` → ``[N, C,
    crop, crop]``). A crop that reaches past a side shorter than ``crop`` is padded with zeros and its scores
    cropped back."""
    if crop <= 0 or not 0 < stride <= crop:
        raise ValueError(f"sliding window needs 0 < stride <= crop, got crop {crop}, stride {stride}")
    batch, _, height, width = images.shape
    tiles, places = [], []
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            tile = images[..., top:top + crop, left:left + crop]
            rows, cols = tile.shape[-2:]
            tiles.append(F.pad(tile, (0, crop - cols, 0, crop - rows)))
            places.append((top, left, rows, cols))
    scores = predict(torch.cat(tiles)).float()
    total = scores.new_zeros(batch, scores.shape[1], height, width)
    count = scores.new_zeros(1, 1, height, width)
    for index, (top, left, rows, cols) in enumerate(places):
        total[..., top:top + rows, left:left + cols] += scores[index * batch:(index + 1) * batch, :, :rows, :cols]
        count[..., top:top + rows, left:left + cols] += 1
    return total / count
