"""adala's drop-in attentions ("plugs", :mod:`adala.attention.plug`), selected by name (:mod:`.registry`): linear
attention with its φ kernels (functional form, reference and fused Triton fast path) and the paper's baselines.
Importing this package registers every plug with timm as ``attn_layer="adala_<name>"``."""
from adala.attention.fast import FAST_KERNELS, IMPLS, attention, fast_linear_attention
from adala.attention.kernels import KERNELS, get_kernel
from adala.attention.linear import DEFAULT_EPS, linear_attention
from adala.attention.module import TIMM_NAME, LinearAttention
from adala.attention.plug import AttentionPlug
from adala.attention.registry import PLUGS, TIMM_PREFIX, get_plug, register

# The plugs: each module registers its class on import.
from adala.attention import cosformer  # noqa: F401,E402
from adala.attention import hedgehog  # noqa: F401,E402
from adala.attention import l2vit  # noqa: F401,E402
from adala.attention import linformer  # noqa: F401,E402
from adala.attention import lolcats  # noqa: F401,E402
from adala.attention import monarch  # noqa: F401,E402
from adala.attention import nystrom  # noqa: F401,E402
from adala.attention import performer  # noqa: F401,E402

__all__ = [
    "DEFAULT_EPS", "FAST_KERNELS", "IMPLS", "KERNELS", "PLUGS", "TIMM_NAME", "TIMM_PREFIX", "AttentionPlug",
    "LinearAttention", "attention", "fast_linear_attention", "get_kernel", "get_plug", "linear_attention", "register",
]
