"""Nyströmformer attention (Xiong et al. 2021): softmax attention through landmarks, O(N·m·d) for m landmarks.

With landmark queries Q̃ and keys K̃ (segment means of Q and K):

    F = softmax(Q K̃ᵀ/√d),  A = softmax(Q̃ K̃ᵀ/√d),  B = softmax(Q̃ Kᵀ/√d),   out = F · pinv(A) · (B V)

pinv(A) is the iterative Moore-Penrose approximation of the reference code, ``pinv_iterations`` steps of
Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))) from Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞). The reference takes the two norms as maxima
over the whole batch and all heads; here they are taken per matrix, so one image's output does not depend on the
batch it is in (Z₀ stays inside the iteration's convergence region either way).

Token layout (the reference has no class or register tokens, and pads the sequence at the front with zero tokens
to a multiple of m):

- Patch tokens are split into m contiguous segments in raster order; when their count is not a multiple of m the
  segment sizes differ by one instead of padding, so no padding token enters a landmark or the keys.
- Each class/register token is a landmark of its own: these tokens are outliers among the keys (register tokens
  exist to absorb attention), and averaging one into a segment of patches would corrupt that landmark.
- Class/register queries attend with exact softmax over all keys: P rows cost O(P·N·d), still linear, and the
  class token's output is what the classifier reads.
- With no more patch tokens than landmarks, every patch would be its own landmark and the approximation can at best
  reproduce softmax attention, so the plug computes exact softmax attention instead.

Nothing new is trained: Stage 1 trains ``qkv``. Everything runs in fp32 or wider (the iterative inverse is unusable
in bf16).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adala.attention.linear import _autocast_off
from adala.attention.plug import AttentionPlug
from adala.attention.registry import register
from adala.attention.segments import segment_matrix
from adala.attention.settings import positive_int


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate Moore-Penrose inverse of each matrix in ``a`` (..., m, m) by the Nyströmformer iteration."""
    col_sums = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True)  # ‖A‖₁, per matrix
    row_sums = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True)  # ‖A‖∞, per matrix
    z = a.transpose(-2, -1) / (col_sums * row_sums).unsqueeze(-1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register
class NystromAttention(AttentionPlug):
    """Nyströmformer attention with its own landmark for each class/register token (see the module docstring)."""

    name = "nystrom"
    defaults = {"landmarks": 128, "pinv_iterations": 6}
    stage1_trainable = ("qkv",)
    subquadratic = True

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        for setting in self.defaults:
            positive_int(self.name, setting, self.settings[setting])
        if self.attn_drop:
            raise ValueError("nystrom attention forms no attention matrix to drop out; build with attn_drop_rate=0")

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prefix, landmarks = self.num_prefix_tokens, self.settings["landmarks"]
        patches = q.shape[-2] - prefix
        if patches <= landmarks:
            return F.scaled_dot_product_attention(q, k, v)
        out_dtype = v.dtype
        wide = torch.promote_types(out_dtype, torch.float32)  # fp32, or float64 when given
        with _autocast_off(q.device):
            q, k, v = q.to(wide) * self.head_dim ** -0.5, k.to(wide), v.to(wide)
            means = segment_matrix(patches, landmarks, device=q.device, dtype=q.dtype)
            q_land = torch.cat([q[..., :prefix, :], means @ q[..., prefix:, :]], dim=-2)
            k_land = torch.cat([k[..., :prefix, :], means @ k[..., prefix:, :]], dim=-2)
            f = torch.softmax(q[..., prefix:, :] @ k_land.transpose(-2, -1), dim=-1)
            a = torch.softmax(q_land @ k_land.transpose(-2, -1), dim=-1)
            b = torch.softmax(q_land @ k.transpose(-2, -1), dim=-1)
            patch_out = f @ (iterative_pinv(a, self.settings["pinv_iterations"]) @ (b @ v))
            prefix_out = torch.softmax(q[..., :prefix, :] @ k.transpose(-2, -1), dim=-1) @ v
            out = torch.cat([prefix_out, patch_out], dim=-2)
        return out.to(out_dtype)
