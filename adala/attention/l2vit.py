"""L²ViT's enhanced linear attention (Zheng et al., "The Linear Attention Resurrection in Vision Transformer").

Global part, per head with a learnable temperature t:

    out_i = t · φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / max(φ(q_i)ᵀ Σ_j φ(k_j), β),   φ = ReLU

The denominator is bounded below by β (setting ``min_denominator``, 100 as in the reference code; sums over
tokens, not means), so a query whose features barely overlap the keys' gets a damped output instead of a
division by ≈ 0. Computed in fp32 (or wider) from means over tokens, with β/N, which is the same quotient.

Local part, the local concentration module (LCM), on the patch-token grid after attention:
y += DWConv7 → GELU → BatchNorm → DWConv7 (y), class/register tokens passing through unchanged. L²ViT applies it
to the block's residual stream through a LayerNorm of its own; a drop-in attention only owns the attention branch,
so here it refines the branch's output (after the output projection), before the block's residual sum.

Initialisation for a converted model: t = 1, not the reference's d^-½ (for training from scratch), so that
wherever the bound does not bite the output is a convex combination of values, on the scale of softmax attention's;
the LCM's last convolution is zero (weights and bias), so the module adds nothing until it is trained.
Stage 1 trains ``qkv``, the temperature and the LCM.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adala.attention.linear import _autocast_off
from adala.attention.plug import AttentionPlug
from adala.attention.registry import register

LCM_KERNEL = 7


class LocalConcentration(nn.Module):
    """Depthwise conv → GELU → BatchNorm → depthwise conv over (batch, channels, rows, columns)."""

    def __init__(self, channels: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(channels, channels, LCM_KERNEL, padding=LCM_KERNEL // 2, groups=channels, **dd)
        self.bn = nn.BatchNorm2d(channels, **dd)
        self.conv2 = nn.Conv2d(channels, channels, LCM_KERNEL, padding=LCM_KERNEL // 2, groups=channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(F.gelu(self.conv1(x))))


@register
class L2ViTAttention(AttentionPlug):
    """ReLU linear attention with a per-head temperature and a bounded denominator, plus the LCM."""

    name = "l2vit"
    defaults = {"min_denominator": 100.0}
    stage1_trainable = ("qkv", "temperature", "lcm")
    subquadratic = True

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        bound = self.settings["min_denominator"]
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
            raise ValueError(f"attention 'l2vit': setting min_denominator must be a positive number, got {bound!r}")
        if self.attn_drop:
            raise ValueError("l2vit attention forms no attention matrix to drop out; build with attn_drop_rate=0")
        self.temperature = nn.Parameter(torch.empty(self.num_heads, device=device, dtype=dtype))
        self.lcm = LocalConcentration(self.proj.out_features, device=device, dtype=dtype)
        self.reset_plug_parameters()

    def reset_plug_parameters(self) -> None:
        with torch.no_grad():
            self.temperature.fill_(1.0)
            self.lcm.conv1.reset_parameters()
            self.lcm.bn.reset_parameters()
            self.lcm.bn.reset_running_stats()
            nn.init.zeros_(self.lcm.conv2.weight)
            nn.init.zeros_(self.lcm.conv2.bias)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out_dtype = v.dtype
        wide = torch.promote_types(out_dtype, torch.float32)  # fp32, or float64 when given
        with _autocast_off(q.device):
            fq, fk, v = F.relu(q.to(wide)), F.relu(k.to(wide)), v.to(wide)
            tokens = k.shape[-2]
            state = fk.transpose(-2, -1) @ v / tokens  # (b, h, d, d_v)
            normaliser = fk.mean(dim=-2, keepdim=True).transpose(-2, -1)  # (b, h, d, 1)
            denominator = (fq @ normaliser).clamp_min(self.settings["min_denominator"] / tokens)
            out = (fq @ state) * self.temperature.to(wide)[:, None, None] / denominator
        return out.to(out_dtype)

    def output(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm(mixed))
        prefix = self.num_prefix_tokens
        rows, cols = self.patch_grid(y.shape[1])
        patches = y[:, prefix:].transpose(1, 2).reshape(y.shape[0], -1, rows, cols)
        local = self.lcm(patches).flatten(2).transpose(1, 2)
        y = torch.cat([y[:, :prefix], y[:, prefix:] + local], dim=1)
        return self.proj_drop(y)
