"""Raw webdataset samples to tensors: decode the fields a stage reads, apply its transform; a sample that
cannot be used is counted and dropped."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from adala.data.skips import Skips
from adala.data.transforms import Transform

# What a stage can ask for, and the tar member extensions each is read from (first present wins).
FIELDS = {"image": ("jpg", "jpeg", "png", "webp"), "label": ("cls",), "mask": ("seg.png",)}


@dataclass(frozen=True)
class Decoder:
    fields: tuple[str, ...]
    transform: Transform

    def __post_init__(self) -> None:
        unknown = set(self.fields) - set(FIELDS)
        if unknown or "image" not in self.fields:
            raise ValueError(f"fields must include 'image' and be among {sorted(FIELDS)}, got {list(self.fields)}")

    def wanted(self, member: str) -> bool:
        """Whether a tar member is read at all (its extension, everything after the first dot of the name)."""
        extension = member.rsplit("/", 1)[-1].partition(".")[2].lower()
        return any(extension in FIELDS[field] for field in self.fields)

    def __call__(self, sample: dict[str, Any], skips: Skips, seed: int = 0) -> Optional[dict[str, torch.Tensor]]:
        """The sample's tensors, or None (counted in ``skips``). The transform draws its randomness from torch's
        CPU generator seeded with ``seed`` and restored afterwards: a sample's augmentation depends only on where
        it is in the stream, not on which process decodes it or what else used the generator."""
        where = f"{sample.get('__url__')}: {sample.get('__key__')}"
        raw = {}
        for field in self.fields:
            found = next((sample[ext] for ext in FIELDS[field] if ext in sample), None)
            if found is None:
                skips.record("skipped_missing_field", where, f"no {field} ({'/'.join(FIELDS[field])})")
                return None
            raw[field] = found
        try:
            image = decode_image(raw["image"])
            mask = decode_mask(raw["mask"]) if "mask" in raw else None
            with torch.random.fork_rng(devices=()):
                torch.default_generator.manual_seed(seed)
                pixels, target = self.transform(image, mask)
            label = torch.tensor(int(raw["label"])) if "label" in raw else None
        except Exception as err:  # corrupt or truncated image, mask of another size, label that is not a number
            skips.record("skipped_corrupt", where, err)
            return None
        out = {"image": pixels}
        if target is not None:
            out["mask"] = target
        if label is not None:
            out["label"] = label
        return out


def decode_image(data: bytes) -> torch.Tensor:
    """uint8 RGB ``[3, H, W]`` from encoded bytes (any format PIL reads; a truncated file is an error)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def decode_mask(data: bytes) -> torch.Tensor:
    """Class indices ``[H, W]`` from a PNG (greyscale or palette: PIL gives the indices either way)."""
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)), dtype=np.uint8))
