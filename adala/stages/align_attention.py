"""Stage 1, attention alignment (paper Eq. 3).

Every block of the frozen softmax teacher gets a linear-attention branch, initialised from the block's own
Q/K/V and sharing its frozen output projection. One teacher forward trains all branches at once: each branch
sees the block's normalised input X_l and is pulled towards the softmax output A_l by a per-block MSE, while
the teacher's own output flows on to the next block. Only the branches' Q/K/V weights train.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adala.attention import LinearAttention
from adala.engine.loop import Batch, StageParts
from adala.models import save_export
from adala.stages.common import export_metadata, frozen_teacher

FIELDS = ("image",)
STREAM = "resampled"  # how it reads its training data: see adala.data.pipeline


class AlignedAttention(nn.Module):
    """Wraps a block's softmax attention: returns its output and records the linear branch's error on it."""

    def __init__(self, softmax: nn.Module, *, kernel: str, eps: float) -> None:
        super().__init__()
        self.softmax = softmax
        self.linear = LinearAttention.from_softmax(softmax, kernel=kernel, eps=eps)
        self.linear.proj = softmax.proj  # shared and frozen: only Q/K/V of the branch train
        for module in (self.linear.q_norm, self.linear.k_norm, self.linear.norm):
            module.requires_grad_(False)
        self.linear.qkv.requires_grad_(True)
        self.loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        with torch.no_grad():
            target = self.softmax(x, attn_mask=attn_mask, is_causal=is_causal)
        prediction = self.linear(x.detach())
        self.loss = F.mse_loss(prediction.float(), target.float())
        return target


class AttentionAlignment(nn.Module):
    """The teacher with an :class:`AlignedAttention` in every block; its trainable state is the branches."""

    def __init__(self, teacher: nn.Module, *, kernel: str, eps: float) -> None:
        super().__init__()
        teacher.requires_grad_(False)
        for block in teacher.blocks:
            block.attn = AlignedAttention(block.attn, kernel=kernel, eps=eps)
        self.teacher = teacher

    def train(self, mode: bool = True) -> "AttentionAlignment":
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode (dropout, drop-path)
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.teacher.forward_features(images)
        return [block.attn.loss for block in self.teacher.blocks]

    def student(self) -> nn.Module:
        """The linearized ViT: the teacher with each softmax attention replaced by its trained branch."""
        for block in self.teacher.blocks:
            block.attn.loss = None  # drop the last step's graph; it cannot be copied
        student = copy.deepcopy(self.teacher)
        for block in student.blocks:
            block.attn = block.attn.linear
        return student


def build(cfg: Any) -> StageParts:
    teacher = frozen_teacher(cfg.model)
    model = AttentionAlignment(teacher, kernel=cfg.attention.kernel, eps=cfg.attention.eps)

    def loss(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_block = model(batch["image"])
        return torch.stack(per_block).sum(), {f"block{i:02d}": l.detach() for i, l in enumerate(per_block)}

    def export(path: Path) -> Path:
        student = model.student()
        return save_export(student.state_dict(), path, export_metadata(cfg, student))

    branches = [p for block in teacher.blocks for p in block.attn.linear.qkv.parameters()]
    return StageParts(model=model, param_groups=[{"params": branches, "name": "qkv"}], loss=loss, export=export)
