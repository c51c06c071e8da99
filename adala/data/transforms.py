"""Image (and mask) transforms with the model's own normalisation."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from adala.errors import UserError

Transform = Callable[[Image.Image, Optional[np.ndarray]], tuple[torch.Tensor, Optional[torch.Tensor]]]
TRANSFORMS = ("plain", "align", "eval")


def build_transform(
    name: str, *, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Transform:
    """``plain``: resize; ``align``: random resized crop + colour jitter (Stages 1-2); ``eval``: resize + centre
    crop. Masks follow the image's geometry with nearest-neighbour sampling."""
    if name == "plain":
        geometry = v2.Resize((img_size, img_size), antialias=True)
        photometric = None
    elif name == "align":
        geometry = v2.RandomResizedCrop(img_size, scale=(0.25, 1.0), antialias=True)
        photometric = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
    elif name == "eval":
        geometry = v2.Compose([v2.Resize(int(round(img_size * 1.14)), antialias=True), v2.CenterCrop(img_size)])
        photometric = None
    else:
        raise UserError(f"unknown transform {name!r}; use one of {', '.join(TRANSFORMS)}")
    to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def apply(image: Image.Image, mask: Optional[np.ndarray] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        pixels = v2.functional.pil_to_tensor(image)
        if mask is None:
            pixels = geometry(pixels)
            target = None
        else:
            from torchvision import tv_tensors

            pixels, target = geometry(pixels, tv_tensors.Mask(torch.from_numpy(mask).long()))
            target = target.as_subclass(torch.Tensor)
        if photometric is not None:
            pixels = photometric(pixels)
        return to_float(pixels), target

    return apply
