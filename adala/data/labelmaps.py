"""Mask label conventions of the segmentation data sets, applied when their shards are written: every mask in
a shard holds train ids 0..C-1 and 255 for pixels that are not scored."""
from __future__ import annotations

import io

import numpy as np

IGNORE = 255

# Cityscapes (cityscapesScripts labels.py): labelId -> trainId for the 19 evaluated classes; all others ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
ADE20K_CLASSES = 150


def _cityscapes() -> np.ndarray:
    table = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def _ade20k() -> np.ndarray:
    """ADE20K's 0 is "other": ignored; classes 1..150 shift down to 0..149 (mmseg's reduce_zero_label)."""
    table = (np.arange(256) - 1).astype(np.uint8)
    table[0] = IGNORE
    table[IGNORE] = IGNORE
    return table


TABLES = {"cityscapes": _cityscapes(), "ade20k": _ade20k()}


def remap_mask(png: bytes, table: str) -> bytes:
    """A mask PNG with its values looked up in ``TABLES[table]``, as an 8-bit greyscale PNG."""
    from adala.data.tario import encode_png
    from PIL import Image

    values = np.array(Image.open(io.BytesIO(png)))
    if values.ndim != 2 or values.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit single-channel label PNG, got {values.dtype} of shape {values.shape}")
    return encode_png(TABLES[table][values])
