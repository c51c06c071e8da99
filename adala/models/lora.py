"""Low-rank adapters (LoRA) on the blocks' attention projections, as LoLCATS fine-tunes after attention transfer.

:func:`add_lora` swaps every block's ``attn.qkv`` and ``attn.proj`` for a :class:`LoRALinear`, which keeps the
linear layer's ``weight`` and ``bias`` (frozen) and adds ``lora_a``, ``lora_b`` and the scale α / r as a buffer;
:func:`merge_lora` folds the adapters of a state dict into the weights, so exports have plain timm keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_KEYS = ("lora_a", "lora_b", "lora_scale")


class LoRALinear(nn.Linear):
    """``linear`` (its weights, frozen) plus a trainable update: y = x Wᵀ + b + (α / r) · x Aᵀ Bᵀ, B starting at 0."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        dd = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, **dd)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if self.bias is not None:
                self.bias.copy_(linear.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, **dd))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, **dd))
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, dtype=torch.float32, device=dd["device"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scale.to(x.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze ``model`` and give every block's ``attn.qkv`` and ``attn.proj`` rank-``rank`` adapters (the only
    parameters left to train); returns ``model``."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model.requires_grad_(False)
    for block in model.blocks:
        for name in ("qkv", "proj"):
            setattr(block.attn, name, LoRALinear(getattr(block.attn, name), rank, alpha))
    return model


def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every adapter folded into its layer's weight (W + α / r · B A) and its entries removed."""
    merged = {key: value for key, value in state.items() if not key.endswith(LORA_KEYS)}
    for key in state:
        if key.endswith(".lora_a"):
            layer = key[: -len("lora_a")]
            update = state[layer + "lora_b"].float() @ state[key].float() * state[layer + "lora_scale"].float()
            merged[layer + "weight"] = (state[layer + "weight"].float() + update).to(state[layer + "weight"].dtype)
    return merged


__all__ = ["LoRALinear", "add_lora", "merge_lora"]
