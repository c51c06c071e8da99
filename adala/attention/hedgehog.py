"""Hedgehog attention (Zhang et al. 2024, "The Hedgehog & the Porcupine"): linear attention with learned feature maps.

Per head, queries and keys pass through their own map W (head_dim × feature_dim, initialised to the identity):

    φ(x) = [softmax(xW), softmax(−xW)]      (each softmax over the feature dim; 2 × feature_dim features)
    O = φ(Q) (φ(K)ᵀ V) / (φ(Q) Σ_j φ(k_j))

as in the LoLCATS code's ``softmax_dim`` map (features clamped below at 1e-12 there and here, so the normaliser
stays positive). The maps see the raw queries and keys, without the softmax scale: they learn it. The Hedgehog
recipe trains only the maps, by distilling softmax attention scores (Stage 1's defaults here: trains
``feature_map``, objective ``attention_scores``); :meth:`HedgehogAttention.attention_weights` gives the N×N
weights for that loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adala.attention.features import accumulation_dtype, feature_attention, feature_weights
from adala.attention.linear import _autocast_off
from adala.attention.plug import AttentionPlug
from adala.attention.registry import register
from adala.attention.settings import positive_int

FEATURE_FLOOR = 1e-12


class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(xW), softmax(−xW)] with one W per head."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each head's W to the identity (head_dim × feature_dim: extra feature columns start at zero)."""
        heads, head_dim, feature_dim = self.weight.shape
        with torch.no_grad():
            eye = torch.eye(head_dim, feature_dim, device=self.weight.device, dtype=self.weight.dtype)
            self.weight.copy_(eye.expand(heads, head_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens, head_dim) -> (batch, heads, tokens, 2 × feature_dim), in fp32 (fp64 for fp64)."""
        dtype = accumulation_dtype(x, self.weight)
        projected = torch.einsum("bhnd,hdf->bhnf", x.to(dtype), self.weight.to(dtype))
        features = torch.cat([projected.softmax(dim=-1), (-projected).softmax(dim=-1)], dim=-1)
        return features.clamp_min(FEATURE_FLOOR)


class FeatureMapPlug(AttentionPlug):
    """Shared by the plugs with Hedgehog maps: ``feature_map_q`` and ``feature_map_k``, sized by ``feature_dim``."""

    shapes_follow_settings = True  # weights with another feature_dim load into a plug built with the default

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        dim = self.settings["feature_dim"]
        positive_int(self.name, "feature_dim", dim)
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, dim, device=device, dtype=dtype)
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, self.head_dim, dim, device=device, dtype=dtype)

    def reset_plug_parameters(self) -> None:
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(Q), φ(K) in fp32 (fp64 for fp64 inputs)."""
        return self.feature_map_q(q), self.feature_map_k(k)


@register
class HedgehogAttention(FeatureMapPlug):
    """Hedgehog linear attention (``attention=hedgehog``); setting ``feature_dim`` (64: 128 features per head)."""

    name = "hedgehog"
    defaults = {"feature_dim": 64}
    stage1_trainable = ("feature_map",)
    stage1_objective = "attention_scores"
    subquadratic = True

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with _autocast_off(q.device):
            fq, fk = self.features(q, k)
            out = feature_attention(fq, fk, v)
        return out.to(v.dtype)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The normalised attention weights φ(Q)φ(K)ᵀ / row sums, (batch, heads, N, N) in fp32 (fp64 for fp64
        inputs), from the same q, k as :meth:`mix` (after the q/k norms). Quadratic, like the softmax weights it is
        distilled from."""
        with _autocast_off(q.device):
            return feature_weights(*self.features(q, k))
