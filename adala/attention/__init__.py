"""Linear attention: φ kernels, the functional form and a drop-in module for timm ViTs."""
from adala.attention.kernels import KERNELS, get_kernel
from adala.attention.linear import DEFAULT_EPS, linear_attention
from adala.attention.module import LinearAttention

__all__ = ["KERNELS", "DEFAULT_EPS", "LinearAttention", "get_kernel", "linear_attention"]
