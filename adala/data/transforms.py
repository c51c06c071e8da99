"""Image (and mask) transforms with the model's own normalisation.

A transform takes a decoded uint8 image ``[3, H, W]`` and, for segmentation, its class mask ``[H, W]``, and
returns the normalised float image at the training resolution and the mask under the same geometry (nearest
neighbour). Transforms are small picklable objects, so DataLoader workers can be started with any method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from adala.data.seg_transforms import FitResize, RandomScaleCrop
from adala.errors import UserError

TRANSFORMS = ("plain", "align", "seg", "eval", "seg_train", "seg_eval")
EVAL_RESIZE_RATIO = 1.14  # resize the short side to 1.14 × the crop (256 for 224), then centre-crop
ALIGN_SCALE = (0.25, 1.0)  # random resized crop: fraction of the image area kept
COLOUR_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
# mmseg's PhotoMetricDistortion ranges: brightness ±32/255 (here a factor), contrast and saturation 0.5-1.5, hue ±18°.
SEG_JITTER = dict(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)


@dataclass(frozen=True)
class Transform:
    """``plain``: resize to img_size²; ``align``: random resized crop + colour jitter (Stages 1-2);
    ``seg``: random resized crop + horizontal flip applied jointly to image and mask (segmentation training);
    ``eval``: resize + centre crop; ``seg_train`` and ``seg_eval``: the segmentation protocol
    (:mod:`adala.data.seg_transforms`) around ``scale`` (long, short side; default 4·img_size, img_size), with a
    crop of img_size² and photometric jitter in training, whole images in evaluation."""

    name: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: Optional[tuple[int, int]] = None
    cat_max_ratio: float = 1.0  # seg_train: the largest share of a crop's labelled pixels one class may cover

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
        pixels = v2.functional.to_dtype(pixels.as_subclass(torch.Tensor), torch.float32, scale=True)
        if photometric is not None:
            pixels = photometric(pixels)
        return v2.functional.normalize(pixels, self.mean, self.std), target

    @cached_property
    def _parts(self) -> tuple[Callable, Optional[ColourJitter]]:
        size = self.img_size
        if self.name == "plain":
            return v2.Resize((size, size), antialias=True), None
        if self.name == "align":
            return v2.RandomResizedCrop(size, scale=ALIGN_SCALE, antialias=True), ColourJitter(**COLOUR_JITTER)
        if self.name == "seg":
            return v2.Compose([v2.RandomResizedCrop(size, scale=ALIGN_SCALE, antialias=True), v2.RandomHorizontalFlip()]), None
        scale = self.scale or (4 * size, size)
        if self.name == "seg_train":
            return RandomScaleCrop(scale, size, self.cat_max_ratio), ColourJitter(**SEG_JITTER)
        if self.name == "seg_eval":
            return FitResize(scale), None
        return v2.Compose([v2.Resize(int(round(size * EVAL_RESIZE_RATIO)), antialias=True), v2.CenterCrop(size)]), None


class ColourJitter:
    """torchvision's ColorJitter (brightness, contrast, saturation, hue; random factors, in random order) as one
    affine colour map on a float image in [0, 1], clamped once at the end.

    Brightness, contrast and saturation are linear already; hue is a rotation about the grey axis in YIQ space
    (as NVIDIA DALI's hue) instead of a round trip through HSV, which alone takes about four times as long as
    decoding and cropping together at 512². Contrast blends with the mean grey of the image at that point in
    the chain, computed exactly from the input's channel means.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        matrix, offset = torch.eye(3), torch.zeros(3)
        mean = image.mean(dim=(1, 2))
        for op in torch.randperm(4).tolist():
            if op == 0:
                step, shift = torch.eye(3) * _uniform(1 - self.brightness, 1 + self.brightness), torch.zeros(3)
            elif op == 1:
                factor = _uniform(1 - self.contrast, 1 + self.contrast)
                grey = GREY @ (matrix @ mean + offset)
                step, shift = torch.eye(3) * factor, torch.full((3,), (1 - factor) * float(grey))
            elif op == 2:
                factor = _uniform(1 - self.saturation, 1 + self.saturation)
                step, shift = factor * torch.eye(3) + (1 - factor) * GREY.expand(3, 3), torch.zeros(3)
            else:
                step, shift = _hue_rotation(_uniform(-self.hue, self.hue)), torch.zeros(3)
            matrix, offset = step @ matrix, step @ offset + shift
        out = torch.einsum("ij,jhw->ihw", matrix, image) + offset[:, None, None]
        return out.clamp_(0.0, 1.0)


GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def _hue_rotation(turns: float) -> torch.Tensor:
    """RGB -> RGB matrix turning hue by ``turns``; positive turns move red towards yellow, as HSV hue does."""
    angle = -2 * math.pi * turns
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return YIQ_TO_RGB @ rotation @ RGB_TO_YIQ


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def build_transform(name: str, *, img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    scale: Optional[Sequence[int]] = None, cat_max_ratio: float = 1.0) -> Transform:
    if scale is not None and (len(scale) != 2 or min(scale) <= 0):
        raise UserError(f"data.scale must be [long, short] sides in pixels, got {list(scale)}")
    return Transform(name, int(img_size), tuple(mean), tuple(std), tuple(int(side) for side in scale) if scale else None,
                     float(cat_max_ratio))
