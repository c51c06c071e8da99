"""Linear attention: φ kernels, the functional form (reference and fused Triton fast path) and a drop-in module
for timm ViTs."""
from adala.attention.fast import FAST_KERNELS, IMPLS, attention, fast_linear_attention
from adala.attention.kernels import KERNELS, get_kernel
from adala.attention.linear import DEFAULT_EPS, linear_attention
from adala.attention.module import LinearAttention

__all__ = [
    "DEFAULT_EPS", "FAST_KERNELS", "IMPLS", "KERNELS", "LinearAttention", "attention", "fast_linear_attention",
    "get_kernel", "linear_attention",
]
