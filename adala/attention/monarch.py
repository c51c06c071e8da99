"""MonarchAttention (Yaras et al. 2025): softmax attention projected onto Monarch matrices, zero-shot, O(N^1.5·d).

Softmax rows are the maximisers of a variational problem: for scores S = QKᵀ/√d, softmax(S) = argmax over
row-stochastic M of Σ_rows ⟨M_i, S_i⟩ + H(M_i). MonarchAttention maximises the same objective over Monarch
matrices. Pad N to m·b (b = block size) and write token n = (block, position) = (p, k) for queries, (q, j) for keys:

    M[(p,k), (q,j)] = L[p,k,q] · R[q,k,j]

L[p,k,·] is a distribution over key blocks (the across-block factor, one per query) and R[q,k,·] a distribution over
the positions of key block q (the within-block factor, shared by the queries at position k of every block). Each row
of M is then a distribution whose entropy splits as H(L[p,k,·]) + Σ_q L[p,k,q] H(R[q,k,·]), and maximising the
objective over one factor with the other fixed has a closed form, a softmax:

    R[q,k,·] = softmax_j( Q̂[q,k] · K[q,j] / √d ),      Q̂[q,k] = Σ_p L[p,k,q] Q[p,k] / Σ_p L[p,k,q]
    L[p,k,·] = softmax_q( Q[p,k] · K̄[q,k] / √d + H(R[q,k,·]) ),   K̄[q,k] = Σ_j R[q,k,j] K[q,j]

Start from L = block identity (each query first weighs its own block, where attention concentrates), then
alternate R and L updates ``steps`` times; out[(p,k)] = Σ_q L[p,k,q] Σ_j R[q,k,j] V[q,j]. Each update can only raise
the objective, which is Σ_i logsumexp(S_i) − KL(M_i ‖ softmax(S_i)): more steps never move M further from softmax
attention in KL. One block (b ≥ N) or blocks of one token (b = 1) give exact softmax attention.

Padding keys get zero weight and padding queries are left out of Q̂; where no real query weighs a block position
(the last block's padded positions at the first step), R is uniform over that block's real keys.

Token layout: class/register tokens are tokens like the others here (the method approximates the whole matrix;
as keys they sit in the first block, as queries they get their own L rows). Settings: ``block_size`` (null:
⌈√N⌉, the paper's b ≈ √N) and ``steps`` (T, default 3, the top of the paper's 1–3). No parameters of its own:
Stage 1 trains ``qkv``, so that the approximation fits. Everything runs in fp32 or wider; the largest tensors are
N·max(m, b) scores.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from adala.attention.linear import _autocast_off
from adala.attention.plug import AttentionPlug
from adala.attention.registry import register
from adala.attention.settings import positive_int


def monarch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, steps: int) -> torch.Tensor:
    """MonarchAttention of (..., N, d) queries, keys and values with blocks of ``block_size`` tokens, computed in
    their dtype (callers pass fp32 or wider)."""
    n, d = q.shape[-2:]
    b = min(block_size, n)
    m = math.ceil(n / b)
    pad = m * b - n
    valid = torch.arange(m * b, device=q.device).reshape(m, b) < n  # (block, position)
    q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(*t.shape[:-2], m, b, t.shape[-1]) for t in (q, k, v))
    q = q * d ** -0.5
    key_mask = torch.finfo(q.dtype).min / 2  # finite, so 0 · log R stays 0 at padding keys
    across = torch.eye(m, dtype=q.dtype, device=q.device)[:, None, :].expand(m, b, m)  # L[p, k, q]
    for _ in range(steps):
        weights = across * valid[..., None]  # padding queries take no part in Q̂
        totals = weights.sum(dim=-3).transpose(-2, -1)[..., None]  # (q, k, 1): Σ_p L[p,k,q]
        q_hat = torch.einsum("...pkq,...pkd->...qkd", weights, q) / totals.clamp_min(torch.finfo(q.dtype).tiny)
        logits = torch.einsum("...qkd,...qjd->...qkj", q_hat, k).masked_fill(~valid[:, None, :], key_mask)
        log_within = torch.log_softmax(logits, dim=-1)
        within = log_within.exp()  # R[q, k, j]
        entropy = -(within * log_within).sum(dim=-1)  # (q, k)
        k_bar = torch.einsum("...qkj,...qjd->...qkd", within, k)
        gain = torch.einsum("...pkd,...qkd->...pkq", q, k_bar) + entropy.transpose(-2, -1)[..., None, :, :]
        across = torch.softmax(gain, dim=-1)  # L[p, k, q]
    v_bar = torch.einsum("...qkj,...qjd->...qkd", within, v)
    out = torch.einsum("...pkq,...qkd->...pkd", across, v_bar)
    return out.reshape(*out.shape[:-3], m * b, out.shape[-1])[..., :n, :]


@register
class MonarchAttention(AttentionPlug):
    """MonarchAttention over all tokens (see the module docstring)."""

    name = "monarch"
    defaults = {"block_size": None, "steps": 3}
    stage1_trainable = ("qkv",)
    subquadratic = True

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        positive_int(self.name, "block_size", self.settings["block_size"], optional=True)
        positive_int(self.name, "steps", self.settings["steps"])
        if self.attn_drop:
            raise ValueError("monarch attention forms no attention matrix to drop out; build with attn_drop_rate=0")

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tokens = q.shape[-2]
        block_size = self.settings["block_size"] or math.isqrt(tokens - 1) + 1  # ⌈√N⌉
        out_dtype = v.dtype
        wide = torch.promote_types(out_dtype, torch.float32)  # fp32, or float64 when given
        with _autocast_off(q.device):
            out = monarch_attention(q.to(wide), k.to(wide), v.to(wide), block_size, self.settings["steps"])
        return out.to(out_dtype)
