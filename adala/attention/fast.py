"""The fast path of non-causal linear attention: fused Triton kernels behind a ``torch.library`` custom op.

``fast_linear_attention`` computes what :func:`adala.attention.linear.linear_attention` computes (fp32 state and
normaliser, mean normalisation, eps in the denominator) with two kernel launches forward and two backward
(:mod:`adala.attention.triton_kernels`). The ops are registered with fake implementations and an autograd
formula, so ``torch.compile`` traces through them without a graph break and autograd uses the hand-written
backward. Triton is imported on the first call, never at import.

Kernels: ``elu1``, ``relu`` and ``softplus``. ``exp`` needs a per-(batch, head) maximum over all keys before the
features can be summed (its stabilising shift, :data:`adala.attention.kernels.SHIFTS`); :func:`attention` sends
it to the reference path.

Which path a call takes (:func:`attention`): ``impl="auto"`` uses the fast path for CUDA tensors when Triton is
installed and the kernel is supported, the reference otherwise; ``"reference"`` always the reference;
``"triton"`` always the fast path (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the
first call). The environment variable ``ADALA_LINEAR_ATTENTION`` sets the default for every
:class:`~adala.attention.module.LinearAttention` built afterwards (e.g. ``ADALA_LINEAR_ATTENTION=reference``).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from adala.attention.linear import DEFAULT_EPS, check_shapes, linear_attention

IMPLS = ("auto", "reference", "triton")
IMPL_ENV = "ADALA_LINEAR_ATTENTION"
FAST_KERNELS = ("elu1", "relu", "softplus")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looks for the package without importing it


def resolve_impl(impl: Optional[str] = None) -> str:
    """``impl``, or the ``ADALA_LINEAR_ATTENTION`` environment variable when None, checked against :data:`IMPLS`."""
    chosen = impl if impl is not None else os.environ.get(IMPL_ENV, "auto")
    if chosen not in IMPLS:
        source = "impl" if impl is not None else f"environment variable {IMPL_ENV}"
        raise ValueError(f"unknown linear-attention implementation {chosen!r} in {source}; use one of {', '.join(IMPLS)}")
    return chosen


def uses_fast_path(impl: str, kernel: str, device: torch.device) -> bool:
    if impl == "auto":
        return TRITON_AVAILABLE and device.type == "cuda" and kernel in FAST_KERNELS
    return impl == "triton"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: str = "elu1", eps: float = DEFAULT_EPS,
    impl: str = "auto",
) -> torch.Tensor:
    """Linear attention through the path ``impl`` selects (see the module docstring)."""
    if uses_fast_path(impl, kernel, q.device):
        return fast_linear_attention(q, k, v, kernel=kernel, eps=eps)
    return linear_attention(q, k, v, kernel=kernel, eps=eps)


def fast_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: str = "elu1", eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Linear attention over (batch, heads, tokens, head_dim) tensors with the Triton kernels; output in v's dtype."""
    if kernel not in FAST_KERNELS:
        raise ValueError(f"the Triton path implements kernels {', '.join(FAST_KERNELS)}, not {kernel!r}; "
                         "use adala.attention.linear_attention")
    check_shapes(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"the Triton path needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    return _forward(q, k, v, kernel, eps)[0]


@torch.library.custom_op("adala::linear_attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, S, z); S and z are saved for the backward."""
    from adala.attention import triton_kernels

    return triton_kernels.forward(q, k, v, kernel, eps)


@_forward.register_fake
def _(q, k, v, kernel, eps):
    b, h, n, d = q.shape
    e = v.shape[-1]
    return (
        v.new_empty(b, h, n, e),
        q.new_empty(b, h, d, e, dtype=torch.float32),
        q.new_empty(b, h, d, dtype=torch.float32),
    )


@torch.library.custom_op("adala::linear_attention_backward", mutates_args=())
def _backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
    normaliser: torch.Tensor, kernel: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from adala.attention import triton_kernels

    return triton_kernels.backward(grad, q, k, v, state, normaliser, kernel, eps)


@_backward.register_fake
def _(grad, q, k, v, state, normaliser, kernel, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kernel, eps = inputs
    _, state, normaliser = output
    ctx.save_for_backward(q, k, v, state, normaliser)
    ctx.kernel, ctx.eps = kernel, eps


def _grad(ctx, grad_out, grad_state, grad_normaliser):
    # S and z leave the op only to be saved here; fast_linear_attention never returns them, so their grads are None.
    q, k, v, state, normaliser = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, q, k, v, state, normaliser, ctx.kernel, ctx.eps)
    return dq, dk, dv, None, None


_forward.register_autograd(_grad, setup_context=_setup_context)
