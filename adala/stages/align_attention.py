"""Stage 1, attention alignment (paper Eq. 3), for any attention plug.

Every block of the frozen softmax teacher (but those kept softmax, ``attention.softmax_blocks``) gets a branch:
the chosen plug, initialised from the block's own Q/K/V and output projection. One teacher forward feeds all
branches at once: a probe records each block's normalised input X_l and its target while the teacher's own
output flows on to the next block, and each branch is pulled towards its target by a per-block loss. Only each
plug's ``stage1_trainable`` parameters train; the teacher stays outside the trained model, so it is never in the
optimizer or a checkpoint.

``stage.objective`` picks the target and loss (None: the plug's ``stage1_objective``):

- ``output``: the attention output A_l, MSE (ViT-AdaLA);
- ``head_outputs``: the per-head outputs before the output projection, MSE × 1000 (LoLCATS' attention transfer);
- ``attention_scores``: the softmax attention weights, soft-label cross-entropy against the plug's normalised
  weights (Hedgehog's attention distillation; N² memory per head).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adala.attention import AttentionPlug, get_plug
from adala.engine.loop import Batch, StageParts, StepOutput
from adala.errors import UserError
from adala.models import linearize, save_export
from adala.models.linearize import plug_for
from adala.stages.common import FrozenModule, all_parameters, export_metadata, frozen_teacher, strip_prefix
from adala.stages.task_model import backbone_of, build_student, check_task, export_state, stage1_student, task_of

FIELDS = ("image",)
STREAM = "resampled"  # how it reads its training data: see adala.data.pipeline
OBJECTIVES = ("output", "head_outputs", "attention_scores")
HEAD_OUTPUTS_SCALE = 1000.0  # LoLCATS scales its per-head MSE by 1000


def softmax_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmax attention weights of a timm ``Attention`` on input ``x``: (batch, heads, tokens, tokens)."""
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return torch.softmax((q.float() * attn.scale) @ k.float().transpose(-2, -1), dim=-1)


class BlockProbe(FrozenModule):
    """The frozen teacher; ``forward`` returns, for every aligned block, (attention input, target)."""

    def __init__(self, vit: nn.Module, objective: str, blocks: list[int]) -> None:
        super().__init__(vit)
        self.objective = objective
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._heads: list[torch.Tensor] = []
        for index in blocks:
            attn = vit.blocks[index].attn
            attn.register_forward_hook(self._record)
            if objective == "head_outputs":
                attn.proj.register_forward_pre_hook(self._record_heads)

    def _record_heads(self, module: nn.Module, args: tuple) -> None:
        self._heads.append(args[0])

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.objective == "output":
            target = output
        elif self.objective == "head_outputs":
            target = self._heads.pop()
        else:
            target = softmax_weights(module, args[0])
        self._records.append((args[0], target))

    def forward(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._records, self._heads = [], []
        self.vit.forward_features(images)
        records, self._records = self._records, []
        return records


def _output_loss(branch: AttentionPlug, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(branch(x).float(), target.float())


def _head_outputs_loss(branch: AttentionPlug, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return HEAD_OUTPUTS_SCALE * F.mse_loss(branch.norm(branch.heads(x)).float(), target.float())


def _attention_scores_loss(branch: AttentionPlug, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    q, k, _ = branch.qkv_heads(x)
    weights = branch.attention_weights(q, k).float()
    return -(target * weights.clamp_min(1e-12).log()).sum(-1).mean()


LOSSES: dict[str, Callable[[AttentionPlug, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "output": _output_loss, "head_outputs": _head_outputs_loss, "attention_scores": _attention_scores_loss,
}


class AttentionBranches(nn.Module):
    """One plug per aligned teacher block (keys: block indices, so state-dict keys are ``blocks.<i>.…``); only
    each plug's ``stage1_trainable`` parameters train. With a ``predictor`` (the task route,
    :mod:`adala.stages.task_model`), evaluation returns the student task model's predictions."""

    predictor: Optional[Callable[[Batch], StepOutput]] = None

    def __init__(self, vit: nn.Module, attention: dict[str, Any], objective: str) -> None:
        super().__init__()
        plug, settings = plug_for(vit, attention)
        keep = set(attention.get("softmax_blocks", []))
        self.blocks = nn.ModuleDict({
            str(i): plug.from_softmax(block.attn, **settings)
            for i, block in enumerate(vit.blocks) if i not in keep
        })
        self.loss = LOSSES[objective]
        self.feat_size = vit.patch_embed.dynamic_feat_size  # the patch grid of an image size, for the plugs
        grid = tuple(vit.patch_embed.grid_size)
        self.requires_grad_(False)
        for branch in self.blocks.values():
            branch.set_token_layout(vit.num_prefix_tokens, grid)
            for name, param in branch.named_parameters():
                param.requires_grad_(name.startswith(plug.stage1_trainable))

    def forward(self, batch: Batch) -> StepOutput:
        if not self.training and self.predictor is not None:
            return self.predictor(batch)
        grid = tuple(self.feat_size(batch["image"].shape[-2:]))
        losses = []
        for branch, (x, target) in zip(self.blocks.values(), batch["target"]):
            branch.grid = grid
            losses.append(self.loss(branch, x, target))
        return StepOutput(loss=torch.stack(losses).sum(),
                          scalars={f"block{int(i):02d}": l.detach() for i, l in zip(self.blocks, losses)})


def objective_of(cfg: Any, attention: dict[str, Any]) -> str:
    """``stage.objective``, or the plug's own when unset; a :class:`UserError` for an unknown one."""
    objective = cfg.stage.objective or get_plug(attention["kind"]).stage1_objective
    if objective not in OBJECTIVES:
        raise UserError(f"unknown stage.objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    return objective


def check(cfg: Any, attention: dict[str, Any]) -> None:
    """What validation checks for this stage: an unknown ``stage.objective``, and the task model's head
    (``stage.task_model``)."""
    objective_of(cfg, attention)
    check_task(cfg)


def build(cfg: Any, attention: dict[str, Any]) -> StageParts:
    """``attention``: the branches' plug and settings (a spec, normalised by validation)."""
    objective = objective_of(cfg, attention)
    task = task_of(cfg)  # the task route: the teacher is a task model, the student keeps its head
    teacher = frozen_teacher(cfg.model)
    branches = AttentionBranches(teacher, attention, objective)
    if task is not None:
        branches.predictor = stage1_student(cfg, task, branches.blocks)

    def export(state: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
        """The converted ViT (in the task route with the teacher's head): the teacher's weights with each aligned
        block's attention replaced by its branch."""
        if task is None:
            student = linearize(frozen_teacher(cfg.model), attention)
        else:
            student = build_student(cfg, task, cfg.model.weights, attention)
            metadata = {**task.metadata, **metadata}
        vit = backbone_of(student)
        for index in branches.blocks:
            vit.blocks[int(index)].attn.load_state_dict(strip_prefix(state, f"blocks.{index}."))
        return save_export(export_state(student.state_dict()), path, export_metadata(cfg, vit, **metadata))

    return StageParts(
        model=branches,
        param_groups=all_parameters("qkv"),  # the optimizer keeps the trainable ones: each plug's stage1_trainable
        export=export,
        teacher=BlockProbe(teacher, objective, [int(i) for i in branches.blocks]),
        metric=task.metric() if task is not None else None,
    )
