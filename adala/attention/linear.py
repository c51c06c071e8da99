"""Non-causal kernel linear attention, the reference implementation.

    O_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps),   S = (1/N) Σ_j φ(k_j) v_jᵀ,   z = (1/N) Σ_j φ(k_j)

The 1/N cancels in the ratio but keeps S and z bounded as N grows. Cost is O(N d²); no N×N tensor is formed.
"""
from __future__ import annotations

import contextlib

import torch

from adala.attention.kernels import SHIFTS, get_kernel

DEFAULT_EPS = 1e-6


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v must be (batch, heads, tokens, head_dim) with matching batch, heads, key tokens and q/k width."""
    if q.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q, k, v as (batch, heads, tokens, head_dim) with matching sizes, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel: str = "elu1",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Linear attention over (batch, heads, tokens, head_dim) tensors.

    φ, the d×d state and the normaliser are computed in fp32 whatever the input dtype (autocast included); the
    result is returned in the dtype of ``v``.
    """
    check_shapes(q, k, v)
    phi = get_kernel(kernel)
    out_dtype = v.dtype
    with _autocast_off(q.device):
        q, k = q.float(), k.float()
        fq = phi(q, False)
        fk = phi(k, True)
        if kernel in SHIFTS:  # features are exp(x - shift): put eps on that scale too, so the shift cancels exactly
            log_scale = SHIFTS[kernel](q, False) + SHIFTS[kernel](k, True)
            eps = eps * torch.exp(torch.clamp(-log_scale, min=-80.0, max=80.0))
        n = k.shape[-2]
        state = torch.matmul(fk.transpose(-2, -1), v.float()) / n  # (b, h, d, d_v)
        normaliser = fk.mean(dim=-2)  # (b, h, d)
        numerator = torch.matmul(fq, state)  # (b, h, n, d_v)
        denominator = torch.matmul(fq, normaliser.unsqueeze(-1))  # (b, h, n, 1)
        out = numerator / (denominator + eps)
    return out.to(out_dtype)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # Devices without autocast (meta, used to count FLOPs without computing) have nothing to switch off.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
