"""Stage 2, feature alignment (paper Eq. 4): L = α · MSE(F_teacher, F_student) on the final token features.

The student is the linearized ViT (from the Stage-1 export, or the teacher's weights linearized directly) and
trains in full (``stage.trainable=qkv``: only each block's Q/K/V projection, the paper's Table-9 ablation);
the teacher is the original softmax ViT, frozen, outside the trained model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.engine.loop import Batch, StageParts, StepOutput
from adala.models import build_vfm, model_spec, save_export
from adala.models.lora import add_lora, merge_lora
from adala.stages.common import (
    FrozenModule, all_parameters, export_metadata, frozen_teacher, start_weights, strip_prefix,
)
from adala.stages.task_model import backbone_of, build_student, check_task, export_state, task_of

FIELDS = ("image",)
STREAM = "resampled"  # how it reads its training data: see adala.data.pipeline
# stage.trainable: which student parameters train (paper App. A.7 / Table 9: Q/K/V alone loses 3-10 points).
TRAINABLE = ("all", "qkv")


class FeatureTeacher(FrozenModule):
    """The frozen teacher; ``forward`` returns its final token features (timm ``forward_features``)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


class FeatureAlignment(nn.Module):
    """``student``: the linearized ViT, or a task model holding one (``stage.task_model``), whose backbone aligns
    and which predicts in evaluation."""

    def __init__(self, student: nn.Module, alpha: float) -> None:
        super().__init__()
        self.student = student
        self.alpha = alpha

    def forward(self, batch: Batch) -> StepOutput:
        backbone = backbone_of(self.student)
        if not self.training and backbone is not self.student:  # the task route's evaluation
            return self.student(batch)
        features = backbone.forward_features(batch["image"])
        mse = F.mse_loss(features.float(), batch["target"].float())
        return StepOutput(loss=self.alpha * mse, scalars={"mse": mse.detach()})


def check(cfg: Any, attention: dict[str, Any]) -> None:
    """What validation checks for this stage: the task model's head (``stage.task_model``)."""
    check_task(cfg)


def build(cfg: Any, attention: dict[str, Any]) -> StageParts:
    task = task_of(cfg)  # the task route: the teacher is a task model, the student keeps its (frozen) head
    if task is None:
        student = build_vfm(model_spec(cfg.model), img_size=cfg.model.img_size, weights=start_weights(cfg),
                            attention=attention)
    else:
        student = build_student(cfg, task, start_weights(cfg), attention)
    backbone = backbone_of(student)
    alpha = cfg.stage.alpha if cfg.stage.alpha is not None else cfg.model.alpha
    if cfg.stage.trainable == "qkv":
        student.requires_grad_(False)  # the optimizer keeps the parameters that require gradients
        for block in backbone.blocks:
            block.attn.qkv.requires_grad_(True)
    if cfg.stage.lora:  # LoLCATS' recipe: only low-rank adapters on qkv and proj train
        add_lora(backbone, cfg.stage.lora, cfg.stage.lora_alpha)

    def export(state: dict[str, torch.Tensor], path: Path, **metadata: Any) -> Path:
        metadata = {**(task.metadata if task is not None else {}), **metadata}
        state = export_state(merge_lora(strip_prefix(state, "student.")))
        return save_export(state, path, export_metadata(cfg, backbone, **metadata))

    return StageParts(
        model=FeatureAlignment(student, alpha),
        param_groups=all_parameters("qkv" if cfg.stage.trainable == "qkv" else "student"),
        export=export,
        teacher=FeatureTeacher(frozen_teacher(cfg.model)),
        metric=task.metric() if task is not None else None,
    )
