"""Per-block error of a student ViT against its teacher (paper App. B): how the difference grows block by block.

Both models see the same images; a forward hook on every ``model.blocks[i]`` records the block's output tokens.
The error of block i is ‖S_i − T_i‖ / ‖T_i‖ over all images, tokens and channels (Frobenius norms), so it is 0
for a student equal to its teacher and does not depend on the scale of a model's features.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def block_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block of a timm ViT for ``images`` (one tensor of tokens per block, in fp32)."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out.float())) for block in model.blocks]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@torch.no_grad()
def relative_block_errors(teacher: nn.Module, student: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """‖S_i − T_i‖ / ‖T_i‖ for every block i, accumulated over all ``batches`` of images."""
    squared_diff: list[float] = []
    squared_ref: list[float] = []
    for images in batches:
        reference, produced = block_outputs(teacher, images), block_outputs(student, images)
        if len(reference) != len(produced):
            raise ValueError(f"the teacher has {len(reference)} blocks and the student {len(produced)}")
        if not squared_diff:
            squared_diff, squared_ref = [0.0] * len(reference), [0.0] * len(reference)
        for i, (t, s) in enumerate(zip(reference, produced)):
            squared_diff[i] += float((s - t).pow(2).sum())
            squared_ref[i] += float(t.pow(2).sum())
    if not squared_diff:
        raise ValueError("no images to compare the student with its teacher on")
    return [(d / r) ** 0.5 if r > 0 else float("inf") for d, r in zip(squared_diff, squared_ref)]
