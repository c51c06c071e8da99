"""Procedural images for the built-in demo: two shapes on a textured background.

The class is the ordered pair (type of the left shape, type of the right shape): 4 × 3 = 12 classes. Telling
them apart needs both objects and their relative position, i.e. context across the whole image, which is
what attention provides. Each shape type has its own hue (with jitter) on a grey, textured background, so
recognising an object is easy and the relation between the two is what must be learnt. The segmentation
mask needs the same context: an object's pixels are labelled by the ordered pair (own type, the other
object's type), 1 + ``class_of(own, other)`` (1-12), and 0 is background. A pixel's own surroundings tell
its type only; which of its three classes it belongs to is written in the other shape, anywhere in the image.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
HUES = np.array([[230, 40, 40], [40, 200, 40], [40, 80, 240], [230, 200, 30]], dtype=np.float32)
NUM_CLASSES = len(SHAPES) * (len(SHAPES) - 1)
NUM_SEG_CLASSES = NUM_CLASSES + 1
VERSION = 3  # bump when the images or labels change, so cached shards and teachers are rebuilt


def class_of(left: int, right: int) -> int:
    """Class index of an ordered pair of distinct shape types."""
    return left * (len(SHAPES) - 1) + (right if right < left else right - 1)


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if SHAPES[kind] == "circle":
        return dy * dy + dx * dx <= r * r
    if SHAPES[kind] == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if SHAPES[kind] == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    width = max(1.0, r * 0.35)  # cross
    return ((np.abs(dy) <= width) & (np.abs(dx) <= r)) | ((np.abs(dx) <= width) & (np.abs(dy) <= r))


def render(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """One sample: (uint8 image H×W×3, uint8 mask H×W, class index)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.full(3, rng.uniform(60, 200)) + rng.uniform(-15, 15, 3)
    tilt = rng.uniform(-40, 40, (2, 3))
    image = base + (yy[..., None] / size - 0.5) * tilt[0] + (xx[..., None] / size - 0.5) * tilt[1]
    image = image + rng.normal(0, 12, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    kinds = rng.choice(len(SHAPES), size=2, replace=False)
    r = rng.uniform(size * 0.12, size * 0.2, 2)
    # Left object in the left part, right object to its right with a margin, both anywhere vertically.
    cx_left = rng.uniform(r[0], size * 0.55 - r[0] * 0.5)
    cx_right = rng.uniform(max(cx_left + r[0] + r[1] * 0.6, size * 0.45), size - r[1])
    cx = (cx_left, min(cx_right, size - r[1]))
    cy = rng.uniform(r, size - r)
    for i in range(2):
        inside = _shape_mask(kinds[i], yy, xx, cy[i], cx[i], r[i])
        colour = HUES[kinds[i]] * rng.uniform(0.7, 1.1) + rng.uniform(-20, 20, 3)
        image[inside] = colour + rng.normal(0, 8, (int(inside.sum()), 3))
        mask[inside] = 1 + class_of(int(kinds[i]), int(kinds[1 - i]))
    label = class_of(int(kinds[0]), int(kinds[1]))
    return np.clip(image, 0, 255).astype(np.uint8), mask, label
