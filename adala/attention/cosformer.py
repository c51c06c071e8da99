"""cosFormer attention (Qin et al. 2022): ReLU features re-weighted by token position.

With θ_i = π i / 2M for token position i (1 … M):

    q'_i = [relu(q_i) sin θ_i, relu(q_i) cos θ_i],   k'_j likewise,   O = q'(k'ᵀv) / max(q' Σ_j k'_j, eps)

so q'_i·k'_j = relu(q_i)·relu(k_j) cos(θ_i − θ_j): nearby tokens weigh more. eps is 1e-6, a floor on the normaliser
as in the public code. No N×N tensor is formed.

Positions in a ViT (setting ``prefix_position``): the patches take positions 1 … P in raster order with M = P (the
original's re-weighting along the sequence). Class and register tokens (``num_prefix_tokens``) have no place in the
raster; by default (``"middle"``) they sit at the middle angle π/4, so each weighs every patch by
cos(θ_j − π/4) ∈ [0.71, 1] and neither end of the image is favoured, and the prefix tokens weigh each other fully.
``"sequence"`` instead numbers all tokens 1 … N in sequence order (M = N, prefix tokens first), as the public code
does for any sequence: the class token then leans toward the first rows of patches.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from adala.attention.features import accumulation_dtype, feature_attention
from adala.attention.linear import _autocast_off
from adala.attention.plug import AttentionPlug
from adala.attention.registry import register

EPS = 1e-6
PREFIX_POSITIONS = ("middle", "sequence")


@register
class CosformerAttention(AttentionPlug):
    """cosFormer attention (``attention=cosformer``); setting ``prefix_position`` (``"middle"`` or ``"sequence"``)."""

    name = "cosformer"
    defaults = {"prefix_position": "middle"}
    stage1_trainable = ("qkv",)
    subquadratic = True

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        if self.settings["prefix_position"] not in PREFIX_POSITIONS:
            raise ValueError(f"attention {self.name!r}: setting prefix_position must be one of "
                             f"{', '.join(PREFIX_POSITIONS)}, got {self.settings['prefix_position']!r}")

    def angles(self, tokens: int, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """θ for each of ``tokens`` positions (see the module docstring), shape (tokens, 1)."""
        if self.settings["prefix_position"] == "sequence":
            return (torch.arange(1, tokens + 1, device=device, dtype=dtype) * (math.pi / (2 * tokens)))[:, None]
        p = min(self.num_prefix_tokens, tokens)
        patches = tokens - p
        prefix = torch.full((p,), math.pi / 4, device=device, dtype=dtype)
        patch = torch.arange(1, patches + 1, device=device, dtype=dtype) * (math.pi / (2 * max(patches, 1)))
        return torch.cat([prefix, patch])[:, None]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[relu(x) sin θ, relu(x) cos θ]: (batch, heads, tokens, 2 × head_dim), fp32 (fp64 for fp64 inputs)."""
        x = F.relu(x.to(accumulation_dtype(x)))
        theta = self.angles(x.shape[-2], x.device, x.dtype)
        return torch.cat([x * torch.sin(theta), x * torch.cos(theta)], dim=-1)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with _autocast_off(q.device):
            out = feature_attention(self.features(q), self.features(k), v, eps=EPS)
        return out.to(v.dtype)
