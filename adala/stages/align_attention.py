"""Stage 1, attention alignment (paper Eq. 3).

Every block of the frozen softmax teacher gets a linear-attention branch, initialised from the block's own
Q/K/V and output projection. One teacher forward feeds all branches at once: a probe records each block's
normalised input X_l and softmax attention output A_l while the teacher's own output flows on to the next
block, and each branch is pulled towards A_l by a per-block MSE. Only the branches' Q/K/V weights train; the
teacher stays outside the trained model, so it is never in the optimizer or a checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.attention import LinearAttention
from adala.engine.loop import Batch, StageParts, StepOutput
from adala.models import linearize, save_export
from adala.stages.common import FrozenModule, all_parameters, export_metadata, frozen_teacher, strip_prefix

FIELDS = ("image",)
STREAM = "resampled"  # how it reads its training data: see adala.data.pipeline


class BlockProbe(FrozenModule):
    """The frozen teacher; ``forward`` returns, for every block, (attention input, attention output)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__(vit)
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in vit.blocks:
            block.attn.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._records.append((args[0], output))

    def forward(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._records = []
        self.vit.forward_features(images)
        records, self._records = self._records, []
        return records


class AttentionBranches(nn.Module):
    """One linear-attention branch per teacher block; only each branch's Q/K/V projection trains."""

    def __init__(self, vit: nn.Module, *, kernel: str, eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinearAttention.from_softmax(block.attn, kernel=kernel, eps=eps) for block in vit.blocks)
        self.requires_grad_(False)
        for branch in self.blocks:
            branch.qkv.requires_grad_(True)

    def forward(self, batch: Batch) -> StepOutput:
        losses = [F.mse_loss(branch(x).float(), target.float()) for branch, (x, target) in zip(self.blocks, batch["target"])]
        return StepOutput(loss=torch.stack(losses).sum(), scalars={f"block{i:02d}": l.detach() for i, l in enumerate(losses)})


def build(cfg: Any, attention: dict[str, Any]) -> StageParts:
    """``attention``: the branches' linear attention (kind, kernel, eps), normalised by validation."""
    kernel, eps = attention["kernel"], attention["eps"]
    teacher = frozen_teacher(cfg.model)
    branches = AttentionBranches(teacher, kernel=kernel, eps=eps)

    def export(state: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
        """The linearized ViT: the teacher's weights with each block's attention replaced by its branch."""
        student = linearize(frozen_teacher(cfg.model), kernel=kernel, eps=eps)
        for index, block in enumerate(student.blocks):
            block.attn.load_state_dict(strip_prefix(state, f"blocks.{index}."))
        return save_export(student.state_dict(), path, export_metadata(cfg, student, **metadata))

    return StageParts(
        model=branches,
        param_groups=all_parameters("qkv"),  # the optimizer keeps the trainable ones: each branch's Q/K/V
        export=export,
        teacher=BlockProbe(teacher),
    )
