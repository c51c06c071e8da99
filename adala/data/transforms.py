"""Image (and mask) transforms with the model's own normalisation.

A transform takes a decoded uint8 image ``[3, H, W]`` and, for segmentation, its class mask ``[H, W]``, and
returns the normalised float image at the training resolution and the mask under the same geometry (nearest
neighbour). Transforms are small picklable objects, so DataLoader workers can be started with any method.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from adala.errors import UserError

TRANSFORMS = ("plain", "align", "seg", "eval")
EVAL_RESIZE_RATIO = 1.14  # resize the short side to 1.14 × the crop (256 for 224), then centre-crop
ALIGN_SCALE = (0.25, 1.0)  # random resized crop: fraction of the image area kept
COLOUR_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)


@dataclass(frozen=True)
class Transform:
    """``plain``: resize to img_size²; ``align``: random resized crop + colour jitter (Stages 1-2);
    ``seg``: random resized crop + horizontal flip applied jointly to image and mask (segmentation training);
    ``eval``: resize + centre crop."""

    name: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.name not in TRANSFORMS:
            raise UserError(f"unknown transform {self.name!r}; use one of {', '.join(TRANSFORMS)}")

    def __call__(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        geometry, photometric = self._parts
        if mask is None:
            pixels, target = geometry(image), None
        else:
            pixels, target = geometry(image, tv_tensors.Mask(mask.long()))
            target = target.as_subclass(torch.Tensor)
        if photometric is not None:
            pixels = photometric(pixels)
        pixels = v2.functional.normalize(v2.functional.to_dtype(pixels, torch.float32, scale=True), self.mean, self.std)
        return pixels.as_subclass(torch.Tensor), target

    @cached_property
    def _parts(self) -> tuple[v2.Transform, Optional[v2.Transform]]:
        size = self.img_size
        if self.name == "plain":
            return v2.Resize((size, size), antialias=True), None
        if self.name == "align":
            return v2.RandomResizedCrop(size, scale=ALIGN_SCALE, antialias=True), v2.ColorJitter(**COLOUR_JITTER)
        if self.name == "seg":
            return v2.Compose([v2.RandomResizedCrop(size, scale=ALIGN_SCALE, antialias=True), v2.RandomHorizontalFlip()]), None
        return v2.Compose([v2.Resize(int(round(size * EVAL_RESIZE_RATIO)), antialias=True), v2.CenterCrop(size)]), None


def build_transform(name: str, *, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    return Transform(name, int(img_size), tuple(mean), tuple(std))
