"""A drop-in replacement for timm's ``Attention`` that computes linear attention.

It keeps timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``), so a softmax block's
state dict loads into it unchanged and a linearized model saves with timm key names.

It also carries one persistent buffer, ``linear_config``: its kernel and eps, as UTF-8 JSON in a uint8 tensor
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

import copy
import json
from typing import Any, Callable, Optional

import torch
from timm.models.vision_transformer import ATTN_LAYERS
from torch import nn

from adala.attention.fast import attention, resolve_impl
from adala.attention.kernels import get_kernel
from adala.attention.linear import DEFAULT_EPS

TIMM_NAME = "adala_linear"  # timm.create_model(..., attn_layer=TIMM_NAME)
CONFIG_BUFFER = "linear_config"
CONFIG_BYTES = 64  # fixed size, so every module's buffer has one shape


def encode_config(kernel: str, eps: float, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """``{"eps": ..., "kernel": ...}`` as zero-padded UTF-8 bytes."""
    text = json.dumps({"eps": eps, "kernel": kernel}, sort_keys=True).encode()
    if len(text) > CONFIG_BYTES:
        raise ValueError(f"kernel name {kernel!r} is too long to store")
    return torch.tensor(list(text.ljust(CONFIG_BYTES, b"\0")), dtype=torch.uint8, device=device)


def decode_config(buffer: torch.Tensor) -> dict[str, Any]:
    """The kernel and eps stored by :func:`encode_config`; ValueError for anything else."""
    try:
        config = json.loads(bytes(buffer.cpu().tolist()).rstrip(b"\0"))
        kernel, eps = config["kernel"], float(config["eps"])
    except (ValueError, KeyError, TypeError):
        raise ValueError("not a linear-attention config (expected UTF-8 JSON with kernel and eps)") from None
    get_kernel(kernel)
    return {"kernel": kernel, "eps": eps}


class LinearAttention(nn.Module):
    """Linear attention with timm ``Attention``'s constructor arguments (those timm's blocks pass) and names."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        kernel: str = "elu1",
        eps: float = DEFAULT_EPS,
        impl: Optional[str] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        get_kernel(kernel)  # fail at construction, not on the first forward
        if attn_drop:
            raise ValueError("linear attention forms no attention matrix to drop out; build with attn_drop_rate=0")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm and scale_norm need a norm_layer")
        dd = {"device": device, "dtype": dtype}
        head_dim = head_dim or dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self._kernel = kernel
        self._eps = eps
        self.impl = resolve_impl(impl)
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm: nn.Module = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.norm: nn.Module = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer(CONFIG_BUFFER, encode_config(kernel, eps, device))

    @property
    def kernel(self) -> str:
        """The feature map φ; set at construction or by loading a state dict (it is stored with the weights)."""
        return self._kernel

    @property
    def eps(self) -> float:
        return self._eps

    @classmethod
    def from_softmax(
        cls, attn: nn.Module, *, kernel: str = "elu1", eps: float = DEFAULT_EPS, impl: Optional[str] = None
    ) -> "LinearAttention":
        """Build a linear attention with a copy of ``attn``'s weights (a timm ``Attention``)."""
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated timm attention is not supported by LinearAttention")
        with torch.device("meta"):  # no random init: every weight is copied from ``attn`` below
            module = cls(
                attn.qkv.in_features,
                attn.num_heads,
                head_dim=attn.head_dim,
                dim_out=attn.proj.out_features,
                qkv_bias=attn.qkv.bias is not None,
                proj_bias=attn.proj.bias is not None,
                kernel=kernel,
                eps=eps,
                proj_drop=attn.proj_drop.p,
                impl=impl,
            )
        for name in ("q_norm", "k_norm", "norm"):
            setattr(module, name, copy.deepcopy(getattr(attn, name)))
        weights = {k: v.detach().clone() for k, v in attn.state_dict().items()}
        weights[CONFIG_BUFFER] = encode_config(kernel, eps, attn.qkv.weight.device)
        module.load_state_dict(weights, strict=True, assign=True)
        return module.train(attn.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Take the kernel and eps of the weights being loaded, from their ``linear_config`` entry."""
        stored = state_dict.get(prefix + CONFIG_BUFFER)
        if stored is not None and not stored.is_meta:  # a meta tensor (a model built on the meta device) holds none
            try:
                config = decode_config(stored)
            except ValueError as err:
                error_msgs.append(f"{prefix}{CONFIG_BUFFER}: {err}")
            else:
                self._kernel, self._eps = config["kernel"], config["eps"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        # timm blocks always pass these two arguments; this attention is bidirectional and unmasked.
        if attn_mask is not None or is_causal:
            raise ValueError("LinearAttention is non-causal and takes no attention mask")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, kernel=self._kernel, eps=self._eps, impl=self.impl)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, kernel={self.kernel}, eps={self.eps:g}, impl={self.impl}"
        )


ATTN_LAYERS[TIMM_NAME] = LinearAttention
