"""Non-causal linear attention from feature maps a plug computes itself (learned, random or position-weighted).

    O_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / max(φ(q_i)ᵀ Σ_j φ(k_j), eps)

The plugs built on it (Hedgehog, Performer, cosFormer) follow their references in using sums, not means, over the
keys; their features are bounded or non-negative, so fp32 sums stay finite. No N×N tensor is formed.
"""
from __future__ import annotations

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (the state and normaliser are accumulated in fp32), fp64 for fp64 inputs."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def feature_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Linear attention of non-negative query and key features (batch, heads, tokens, features) over values
    (batch, heads, tokens, value_dim), computed in the dtype of the features (see :func:`accumulation_dtype`)."""
    state = torch.matmul(fk.transpose(-2, -1), v.to(fk.dtype))  # (b, h, features, value_dim)
    numerator = torch.matmul(fq, state)
    denominator = torch.matmul(fq, fk.sum(dim=-2).unsqueeze(-1))
    return numerator / denominator.clamp_min(eps)


def feature_weights(fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
    """The normalised attention weights of :func:`feature_attention` (eps 0), (batch, heads, N, N): quadratic, for
    attention-score losses on small inputs."""
    scores = torch.matmul(fq, fk.transpose(-2, -1))
    return scores / scores.sum(dim=-1, keepdim=True)
