"""Swap every block's softmax attention for linear attention, weights preserved."""
from __future__ import annotations

from typing import Any

from timm.layers import Attention
from torch import nn

from adala.attention import DEFAULT_EPS, LinearAttention


def linearize(model: nn.Module, *, kernel: str = "elu1", eps: float = DEFAULT_EPS) -> nn.Module:
    """Replace ``model.blocks[i].attn`` (timm ``Attention``) by :class:`LinearAttention` in place; returns ``model``.

    Blocks whose attention is already linear are left alone. Other attention modules (e.g. SigLIP's pooling head)
    are not part of the token mixer and stay softmax.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks; linearize expects a timm VisionTransformer")
    for index, block in enumerate(blocks):
        attn = block.attn
        if isinstance(attn, LinearAttention):
            continue
        if not isinstance(attn, Attention):
            raise TypeError(f"block {index} uses {type(attn).__name__}; only timm's Attention can be linearized")
        block.attn = LinearAttention.from_softmax(attn, kernel=kernel, eps=eps)
    return model


def attention_config(model: nn.Module) -> dict[str, Any]:
    """What attention the blocks of ``model`` use, as stored in exports: ``{"kind": "softmax"}`` or
    ``{"kind": "linear", "kernel": ..., "eps": ...}``."""
    linear = [b.attn for b in model.blocks if isinstance(b.attn, LinearAttention)]
    if not linear:
        return {"kind": "softmax"}
    if len(linear) != len(model.blocks):
        raise ValueError("model mixes softmax and linear attention blocks")
    return {"kind": "linear", "kernel": linear[0].kernel, "eps": linear[0].eps}
