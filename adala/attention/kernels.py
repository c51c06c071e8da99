"""Feature maps φ for kernel linear attention.

Each kernel maps queries or keys of shape (..., tokens, head_dim) to non-negative features of the same shape.
Kernels are applied separately to queries and keys because some need a different stabilising shift for each
(see :func:`exp_features`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FeatureMap = Callable[[torch.Tensor, bool], torch.Tensor]


def elu1_features(x: torch.Tensor, is_key: bool = False) -> torch.Tensor:
    """ELU(x) + 1, written so that it stays positive in bf16.

    ``F.elu(x) + 1`` computes ``exp(x) - 1 + 1``; in bf16 the ``- 1 + 1`` cancels to exactly 0 for x ≲ -6 and the
    normaliser of linear attention collapses. ``exp(min(x, 0))`` never rounds to zero before x ≈ -87.
    """
    return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))


def relu_features(x: torch.Tensor, is_key: bool = False) -> torch.Tensor:
    return F.relu(x)


def softplus_features(x: torch.Tensor, is_key: bool = False) -> torch.Tensor:
    return F.softplus(x)


def exp_features(x: torch.Tensor, is_key: bool = False) -> torch.Tensor:
    """exp(x) with a shift that cancels in the attention ratio.

    A query's features are divided by exp(max over its own features): one scalar per query, which cancels between
    numerator and denominator. Keys are shifted by one max per (batch, head), which scales the state and the
    normaliser alike. Without the shift exp overflows for |x| ≳ 88 in fp32 and ≳ 11 in fp16.
    """
    if is_key:
        shift = x.detach().amax(dim=(-2, -1), keepdim=True)
    else:
        shift = x.detach().amax(dim=-1, keepdim=True)
    return torch.exp(x - shift)


KERNELS: dict[str, FeatureMap] = {
    "elu1": elu1_features,
    "relu": relu_features,
    "softplus": softplus_features,
    "exp": exp_features,
}


def get_kernel(name: str) -> FeatureMap:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(
            f"unknown linear-attention kernel {name!r}; choose one of {', '.join(sorted(KERNELS))}"
        ) from None
