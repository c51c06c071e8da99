"""The ``linear`` plug: a drop-in replacement for timm's ``Attention`` that computes linear attention.

Like every plug (:mod:`adala.attention.plug`) it keeps timm's parameter names, so a softmax block's state dict
loads into it unchanged and a linearized model saves with timm key names.

Its config buffer predates the plugs and keeps its name and form, so every linear export loads unchanged:
``linear_config`` holds its kernel and eps, as UTF-8 JSON in a uint8 tensor
(dtype casts leave it alone). The buffer does two things. A linearized model's state dict has keys a softmax
model does not, so strict loading into softmax attention fails instead of silently computing something else.
And loading a state dict sets the kernel and eps the weights were trained with, so a module built with the
defaults takes any linear export. Older exports without the buffer load through :func:`adala.models.load_weights`.

Importing this module registers the class with timm as ``attn_layer="adala_linear"``, so plain timm builds a
linear model from an export in one call (see the README).

``impl`` picks the implementation (see :mod:`adala.attention.fast`): ``"auto"`` runs the fused Triton kernels on
CUDA (kernels elu1, relu, softplus) and the reference :func:`~adala.attention.linear.linear_attention` elsewhere;
``"reference"`` forces the reference, ``"triton"`` the kernels. None (the default) reads the environment variable
``ADALA_LINEAR_ATTENTION`` when the module is built, ``"auto"`` when unset; ``module.impl`` may be changed later.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from adala.attention.fast import attention, resolve_impl
from adala.attention.kernels import get_kernel
from adala.attention.linear import DEFAULT_EPS
from adala.attention.plug import AttentionPlug, decode_json, encode_json
from adala.attention.registry import TIMM_PREFIX, register

TIMM_NAME = TIMM_PREFIX + "linear"  # timm.create_model(..., attn_layer=TIMM_NAME)
CONFIG_BUFFER = "linear_config"
CONFIG_BYTES = 64  # fixed size, so every module's buffer has one shape


def encode_config(kernel: str, eps: float, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """``{"eps": ..., "kernel": ...}`` as zero-padded UTF-8 bytes."""
    return encode_json({"eps": eps, "kernel": kernel}, CONFIG_BYTES, device)


def decode_config(buffer: torch.Tensor) -> dict[str, Any]:
    """The kernel and eps stored by :func:`encode_config`; ValueError for anything else."""
    try:
        config = decode_json(buffer)
        kernel, eps = config["kernel"], float(config["eps"])
    except (ValueError, KeyError, TypeError):
        raise ValueError("not a linear-attention config (expected UTF-8 JSON with kernel and eps)") from None
    get_kernel(kernel)
    return {"kernel": kernel, "eps": eps}


@register
class LinearAttention(AttentionPlug):
    """Linear attention (``attention=linear``): settings ``kernel`` (the feature map φ) and ``eps``."""

    name = "linear"
    defaults = {"kernel": "elu1", "eps": DEFAULT_EPS}
    stage1_trainable = ("qkv",)
    config_buffer = CONFIG_BUFFER

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, impl: Optional[str] = None,
                 **kwargs: Any) -> None:
        get_kernel(kwargs.get("kernel", self.defaults["kernel"]))  # fail at construction, not on the first forward
        if not kwargs.get("eps", DEFAULT_EPS) > 0:
            raise ValueError(f"attention.eps must be positive, got {kwargs['eps']}")
        if attn_drop:
            raise ValueError("linear attention forms no attention matrix to drop out; build with attn_drop_rate=0")
        super().__init__(dim, num_heads, **kwargs)
        self.impl = resolve_impl(impl)

    @property
    def kernel(self) -> str:
        """The feature map φ; set at construction or by loading a state dict (it is stored with the weights)."""
        return self.settings["kernel"]

    @property
    def eps(self) -> float:
        return self.settings["eps"]

    @classmethod
    def from_softmax(cls, attn: nn.Module, *, impl: Optional[str] = None, **settings: Any) -> "LinearAttention":
        """A linear attention with a copy of ``attn``'s weights (a timm ``Attention``)."""
        module = super().from_softmax(attn, **settings)
        module.impl = resolve_impl(impl)
        return module

    def _encoded_config(self, device: Any = None) -> torch.Tensor:
        return encode_config(self.kernel, self.eps, device)

    def _decoded_config(self, buffer: torch.Tensor) -> tuple[dict[str, Any], int]:
        return decode_config(buffer), self.num_prefix_tokens  # token layout plays no part in linear attention

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, kernel=self.kernel, eps=self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"
