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


def exp_shift(x: torch.Tensor, is_key: bool = False) -> torch.Tensor:
    """The stabilising shift of :func:`exp_features`: per query token, or one per (batch, head) for keys."""
    return x.detach().amax(dim=(-2, -1) if is_key else -1, keepdim=True)


def exp_features(x: torch.Tensor, is_key: bool = False) -> torch.Tensor:
    """exp(x - shift), with the shift of :func:`exp_shift`.

    A query's shift is one scalar per query and a key's one per (batch, head); both scale the numerator and the
    normaliser of the attention ratio alike, so they cancel there (``linear_attention`` rescales eps to match).
    Without the shift exp overflows for |x| ≳ 88 in fp32 and ≳ 11 in fp16.
    """
    return torch.exp(x - exp_shift(x, is_key))


KERNELS: dict[str, FeatureMap] = {
    "elu1": elu1_features,
    "relu": relu_features,
    "softplus": softplus_features,
    "exp": exp_features,
}


# Kernels whose features are computed shifted: the shift's function, so eps can be put on the same scale.
SHIFTS: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {"exp": exp_shift}


def get_kernel(name: str) -> FeatureMap:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(
            f"unknown linear-attention kernel {name!r}; choose one of {', '.join(sorted(KERNELS))}"
        ) from None
