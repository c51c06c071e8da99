"""Pieces shared by the stages: the frozen teacher, start weights, export metadata and parameter groups."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from adala.models import attention_config, build_vfm, model_spec, spec_dict, token_layout


def frozen_teacher(model_cfg: Any) -> nn.Module:
    """The original softmax VFM from ``model.weights``: eval mode, no gradients."""
    teacher = build_vfm(model_spec(model_cfg), img_size=model_cfg.img_size, weights=model_cfg.weights,
                        attention={"kind": "softmax"})
    return teacher.eval().requires_grad_(False)


class FrozenModule(nn.Module):
    """Base of the teachers: wraps the frozen ViT, never leaves eval mode (dropout, drop-path), trains nothing."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def train(self, mode: bool = True) -> "FrozenModule":
        return super().train(False)


def start_weights(cfg: Any) -> Optional[str]:
    """Where a stage's trained model starts: the previous stage's export, else the user's weights."""
    return cfg.stage.init or cfg.model.weights


def export_metadata(cfg: Any, backbone: nn.Module, **extra: Any) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "model_spec": spec_dict(model_spec(cfg.model)),  # rebuilds the model anywhere, e.g. one of model=timm
        **token_layout(backbone, cfg.model.img_size),  # img_size, grid and tokens
        "attention": attention_config(backbone),
        "stage": cfg.stage.name,
        **extra,
    }


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, renamed without it (a stage module's ViT → timm key names)."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def backbone_and_head_groups(head_prefixes: tuple[str, ...], backbone_lr_scale: float):
    """Parameter groups for fine-tuning: the pretrained backbone at ``backbone_lr_scale`` × lr, new heads at lr."""

    def groups(model: nn.Module) -> list[dict]:
        backbone, head = [], []
        for name, param in model.named_parameters():
            (head if name.startswith(head_prefixes) else backbone).append(param)
        return [
            {"params": backbone, "lr_scale": backbone_lr_scale, "name": "backbone"},
            {"params": head, "lr_scale": 1.0, "name": "head"},
        ]

    return groups


def all_parameters(name: str):
    """One parameter group holding every parameter of the model."""
    return lambda model: [{"params": list(model.parameters()), "name": name}]
