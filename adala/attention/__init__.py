"""Linear attention: φ kernels, the functional form (reference and fused Triton fast path) and a drop-in module
for timm ViTs, registered with timm as ``attn_layer="adala_linear"`` on import."""
from adala.attention.fast import FAST_KERNELS, IMPLS, attention, fast_linear_attention
from adala.attention.kernels import KERNELS, get_kernel
from adala.attention.linear import DEFAULT_EPS, linear_attention
from adala.attention.module import TIMM_NAME, LinearAttention

__all__ = [
    "DEFAULT_EPS", "FAST_KERNELS", "IMPLS", "KERNELS", "LinearAttention", "TIMM_NAME", "attention",
    "fast_linear_attention", "get_kernel", "linear_attention",
]
