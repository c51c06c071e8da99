"""Tests for adala.attention against a float64 quadratic reference that materialises the N×N matrix.

Tolerances, and why:

* fp32 inputs vs float64 reference: rtol 1e-4, atol 1e-5. The implementation computes in fp32 (unit roundoff
  6e-8); the reductions over N ≤ 197 tokens and d ≤ 64 features give observed errors ≤ 1e-6 at O(1) outputs.
  The exp kernel's stabilising shift must rescale eps with it (``test_exp_kernel_shift_cancels_with_eps``).
* bf16 inputs vs the reference computed from the *bf16-rounded* inputs: rtol 2**-8, atol 1e-5. Everything inside
  runs in fp32, so the only bf16 error is the final rounding of the output, at most half a bf16 ulp = 2**-8
  relative; atol covers fp32 error on outputs that cancel to ≈ 0. A bf16 state or normaliser would miss this bound.
"""
from __future__ import annotations

from typing import Callable

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from adala.attention import DEFAULT_EPS, KERNELS, LinearAttention, linear_attention
from adala.attention.kernels import elu1_features

FP32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_TOL = dict(rtol=2**-8, atol=1e-5)

# The plain maths of each kernel. The exp kernel's stabilising shift cancels in the ratio (eps included, see
# test_exp_kernel_shift_cancels_with_eps), so plain exp is the reference. F.elu(x) + 1 in float64 is accurate
# to 2**-53 / exp(x) relative, fine for x > -30.
REFERENCE_FEATURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "softplus": F.softplus,
    "exp": torch.exp,
}

# (batch, heads, tokens, head_dim, value_dim): odd token counts, batch 1, several heads, ViT-B-like 197 tokens × 64.
SHAPES = [
    (1, 1, 1, 8, 8),
    (2, 3, 7, 16, 16),
    (1, 4, 65, 64, 64),
    (2, 2, 197, 8, 8),
    (1, 3, 197, 64, 64),
    (2, 2, 33, 16, 24),
]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """out = (A V / N) / (A 1 / N + eps) with A = φ(Q) φ(K)ᵀ formed explicitly, in float64."""
    phi = REFERENCE_FEATURES[kernel]
    q, k, v = q.double(), k.double(), v.double()
    n = k.shape[-2]
    a = phi(q) @ phi(k).transpose(-2, -1)
    return (a @ v / n) / (a.sum(dim=-1, keepdim=True) / n + eps)


def random_qkv(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    b, h, n, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, dim, generator=g).to(dtype) for dim in (d, d, dv)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_matches_quadratic_reference_fp32(kernel: str, shape: tuple[int, ...]) -> None:
    q, k, v = random_qkv(shape)
    out = linear_attention(q, k, v, kernel=kernel)
    assert out.dtype == torch.float32 and out.shape == v.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, kernel), **FP32_TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_matches_quadratic_reference_bf16(kernel: str, shape: tuple[int, ...]) -> None:
    q, k, v = random_qkv(shape, torch.bfloat16)
    out = linear_attention(q, k, v, kernel=kernel)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, kernel), **BF16_TOL)


@pytest.mark.parametrize("eps", [DEFAULT_EPS, 1e-3])
def test_eps_enters_the_denominator(eps: float) -> None:
    q, k, v = random_qkv((1, 2, 9, 4, 4))
    q, k = q - 3, k - 3  # small normaliser, so eps visibly matters
    torch.testing.assert_close(
        linear_attention(q, k, v, kernel="elu1", eps=eps).double(),
        reference_attention(q, k, v, "elu1", eps),
        **FP32_TOL,
    )


def test_exp_kernel_shift_cancels_with_eps() -> None:
    """With q, k of std 5 the shift is ≈ exp(30): unless eps is shifted too it acts as ≈ 1e7 on the true scale
    and damps the output."""
    q, k, v = random_qkv((1, 4, 65, 64, 64))
    q, k = 5 * q, 5 * k
    torch.testing.assert_close(
        linear_attention(q, k, v, kernel="exp").double(), reference_attention(q, k, v, "exp"), **FP32_TOL
    )


# Gradients: linear_attention casts to fp32 on purpose, so torch.autograd.gradcheck in float64 cannot pass (its
# finite differences need float64 end to end). Instead the fp32 autograd gradients are compared with the float64
# reference's gradients for a random cotangent: observed errors ≤ 1e-5 at O(1) gradients, hence atol 5e-5.
GRAD_TOL = dict(rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 3, 7, 16, 16), (1, 2, 65, 16, 16)], ids=str)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_gradients_match_float64_reference(kernel: str, shape: tuple[int, ...]) -> None:
    inputs = random_qkv(shape, torch.float64)
    cotangent = torch.randn(shape[:3] + shape[-1:], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x64 = [t.clone().requires_grad_() for t in inputs]
    x32 = [t.float().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference_attention(*x64, kernel), x64, cotangent)
    actual = torch.autograd.grad(linear_attention(*x32, kernel=kernel), x32, cotangent.float())
    for name, got, want in zip("qkv", actual, expected):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_autocast_keeps_fp32_math(kernel: str) -> None:
    """fp32 inputs under bf16 autocast still meet the fp32 tolerance; bf16 matmuls would be ≈ 1e-3 off."""
    q, k, v = random_qkv((1, 4, 197, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v, kernel=kernel)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, kernel), **FP32_TOL)


def test_module_under_autocast_matches_fp32() -> None:
    """Under autocast the qkv and proj layers run in bf16; the result stays finite and within bf16 error."""
    torch.manual_seed(0)
    module = LinearAttention(64, 4)
    x = torch.randn(2, 197, 64)
    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # qkv and proj run as bf16 matmuls over 64 inputs each: observed error ≈ 5e-3 of the output scale, i.e. a few
    # bf16 ulps; 2e-2 leaves a 4× margin and would still catch NaNs, a collapsed normaliser or a wrong dtype path.
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())


def test_elu1_features_stay_positive_in_bf16() -> None:
    x = torch.tensor([-8.0, -20.0, -60.0], dtype=torch.bfloat16)
    features = elu1_features(x)
    assert features.dtype == torch.bfloat16 and (features > 0).all()
    torch.testing.assert_close(features.double(), x.double().exp(), rtol=2**-8, atol=0)
    # The naive form cancels to exactly zero, which is what this test guards against.
    assert torch.equal(F.elu(x) + 1, torch.zeros_like(x))


def test_all_negative_queries_and_keys_in_bf16() -> None:
    """φ ≈ exp(x) ∈ [2e-9, 3e-4] here; the naive elu + 1 is 0 below x ≈ -17 even in fp32 and would give 0/eps.

    eps is tiny so that the normaliser, not eps, sets the output scale and a collapsed normaliser would show.
    """
    g = torch.Generator().manual_seed(0)
    q, k = ((-8 - 12 * torch.rand(1, 2, 33, 16, generator=g)).bfloat16() for _ in range(2))
    v = torch.randn(1, 2, 33, 16, generator=g).bfloat16()
    out = linear_attention(q, k, v, kernel="elu1", eps=1e-20)
    expected = reference_attention(q, k, v, "elu1", eps=1e-20)
    assert torch.isfinite(out).all()
    assert expected.abs().max() > 0.1  # a weighted mean of v, not damped towards 0
    torch.testing.assert_close(out.double(), expected, **BF16_TOL)


class _LargestTensor(TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_no_token_by_token_tensor(kernel: str) -> None:
    """16384 tokens: an N×N matrix would hold 2.7e8 elements; nothing larger than q itself may appear."""
    q, k, v = (t.requires_grad_() for t in random_qkv((1, 1, 16384, 16, 16)))
    with _LargestTensor() as probe:
        out = linear_attention(q, k, v, kernel=kernel)
    assert probe.numel <= q.numel()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unknown_kernel_names_the_valid_ones() -> None:
    q, k, v = random_qkv((1, 1, 4, 8, 8))
    with pytest.raises(ValueError) as error:
        linear_attention(q, k, v, kernel="softmax")
    assert "softmax" in str(error.value) and all(name in str(error.value) for name in KERNELS)
    with pytest.raises(ValueError, match="elu1"):
        LinearAttention(32, 4, kernel="softmax")


TIMM_CONFIGS = {
    "plain": dict(),
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm": dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm),
    "scale_norm": dict(scale_norm=True, norm_layer=nn.LayerNorm),
    "no_proj_bias_dim_out": dict(proj_bias=False, dim_out=48),
}


def make_timm_attention(**config) -> nn.Module:
    """A timm Attention (dim 64, 4 heads) with every parameter random, so copies can't match by accident."""
    attn = timm.layers.Attention(64, num_heads=4, **config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return attn.eval()


@pytest.mark.parametrize("config", TIMM_CONFIGS.values(), ids=TIMM_CONFIGS.keys())
def test_from_softmax_copies_weights_and_keys(config: dict) -> None:
    attn = make_timm_attention(**config)
    linear = LinearAttention.from_softmax(attn)
    theirs, ours = attn.state_dict(), linear.state_dict()
    assert set(ours) == set(theirs) | {"linear_config"}  # the kernel's record: a softmax model refuses the state
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("config", TIMM_CONFIGS.values(), ids=TIMM_CONFIGS.keys())
def test_module_is_proj_of_linear_attention(config: dict, kernel: str) -> None:
    """The forward, written out by hand with the *timm* module's layers."""
    attn = make_timm_attention(**config)
    linear = LinearAttention.from_softmax(attn, kernel=kernel)
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 13, 3, 4, 16).permute(2, 0, 3, 1, 4)
        heads = linear_attention(attn.q_norm(q), attn.k_norm(k), v, kernel=kernel)
        expected = attn.proj(attn.norm(heads.transpose(1, 2).reshape(2, 13, 64)))
        torch.testing.assert_close(linear(x), expected)


def test_module_rejects_masks_and_causality() -> None:
    linear = LinearAttention.from_softmax(make_timm_attention())
    x = torch.randn(1, 5, 64)
    with pytest.raises(ValueError):
        linear(x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError):
        linear(x, is_causal=True)


def test_from_softmax_rejects_gated_attention() -> None:
    with pytest.raises(ValueError, match="gated"):
        LinearAttention.from_softmax(timm.layers.Attention(64, num_heads=4, gated=True))


@pytest.mark.parametrize("training", [True, False])
def test_from_softmax_keeps_the_training_mode(training: bool) -> None:
    attn = timm.layers.Attention(32, num_heads=4, proj_drop=0.5).train(training)
    assert LinearAttention.from_softmax(attn).training is training
