"""A drop-in replacement for timm's ``Attention`` that computes linear attention.

It keeps timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``), so a softmax block's
state dict loads into it unchanged and a linearized model saves with timm key names.

``impl`` picks the implementation (see :mod:`adala.attention.fast`): ``"auto"`` runs the fused Triton kernels on
CUDA (kernels elu1, relu, softplus) and the reference :func:`~adala.attention.linear.linear_attention` elsewhere;
``"reference"`` forces the reference, ``"triton"`` the kernels. None (the default) reads the environment variable
``ADALA_LINEAR_ATTENTION`` when the module is built, ``"auto"`` when unset; ``module.impl`` may be changed later.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from adala.attention.fast import attention, resolve_impl
from adala.attention.kernels import get_kernel
from adala.attention.linear import DEFAULT_EPS


class LinearAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        kernel: str = "elu1",
        eps: float = DEFAULT_EPS,
        proj_drop: float = 0.0,
        impl: Optional[str] = None,
    ) -> None:
        super().__init__()
        get_kernel(kernel)  # fail at construction, not on the first forward
        head_dim = head_dim or dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.kernel = kernel
        self.eps = eps
        self.impl = resolve_impl(impl)
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

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
        module.load_state_dict(weights, strict=True, assign=True)
        return module.train(attn.training)

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
        x = attention(q, k, v, kernel=self.kernel, eps=self.eps, impl=self.impl)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, kernel={self.kernel}, eps={self.eps:g}, impl={self.impl}"
        )

