"""The geometry of the segmentation protocol (mmseg's ADE20K and Cityscapes pipelines), on an image and its mask
together.

Training: resize to fit ``scale`` (long, short side) times a random ratio in [0.5, 2.0], keeping the aspect
ratio; a random crop of ``crop``², padded (image 0, mask 255) where the image is smaller, drawn again (up to
:data:`CROP_TRIES` draws in all, the last one kept) while a single class covers ``cat_max_ratio`` or more of its
labelled pixels, or it holds fewer than two classes (mmseg's ``RandomCrop(cat_max_ratio=0.75)`` of both protocols);
a horizontal flip half the time. Evaluation: resize the image alone to fit ``scale``; its mask keeps the original resolution, where the
predictions are scored. Like torchvision's transforms, each returns what it was given: the image, or the image and
its mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from adala.data.labelmaps import IGNORE

RATIO_RANGE = (0.5, 2.0)
CROP_TRIES = 10
Sample = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # the image, or the image and its mask


def fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size of an image resized to fit ``scale`` (long side ≤ scale[0], short side ≤ scale[1]), aspect kept."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _resize(image: torch.Tensor, mask: Optional[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    image = v2.functional.resize(image, list(size), antialias=True)
    if mask is not None:
        mask = v2.functional.resize(mask[None].to(torch.uint8), list(size),
                                    interpolation=v2.InterpolationMode.NEAREST_EXACT)[0].long()
    return image, mask


@dataclass(frozen=True)
class RandomScaleCrop:
    scale: tuple[int, int]
    crop: int
    cat_max_ratio: float = 1.0  # 1: the first crop drawn

    def __call__(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Sample:
        ratio = float(torch.empty(()).uniform_(*RATIO_RANGE))
        height, width = fit_size(*image.shape[-2:], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, mask = _resize(image, mask, (height, width))
        top, left = self._corner(height, width)
        if mask is not None and self.cat_max_ratio < 1:
            for _ in range(CROP_TRIES - 1):
                if balanced(mask[..., top:top + self.crop, left:left + self.crop], self.cat_max_ratio):
                    break
                top, left = self._corner(height, width)
        image = image[..., top:top + self.crop, left:left + self.crop]
        pad = (0, self.crop - image.shape[-1], 0, self.crop - image.shape[-2])
        image = F.pad(image, pad, value=0)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            image = image.flip(-1)
        if mask is not None:
            mask = F.pad(mask[..., top:top + self.crop, left:left + self.crop], pad, value=IGNORE)
            mask = mask.flip(-1) if flip else mask
        return image if mask is None else (image, mask)

    def _corner(self, height: int, width: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(height - self.crop, 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.crop, 0) + 1, ()))
        return top, left


def balanced(mask: torch.Tensor, cat_max_ratio: float) -> bool:
    """Whether a crop's labelled pixels hold two classes or more, none covering ``cat_max_ratio`` or more of them."""
    counts = torch.bincount(mask[mask != IGNORE].flatten())
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


@dataclass(frozen=True)
class FitResize:
    scale: tuple[int, int]

    def __call__(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Sample:
        image = _resize(image, None, fit_size(*image.shape[-2:], self.scale))[0]
        return image if mask is None else (image, mask)
