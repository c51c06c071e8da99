"""Registry of vision foundation models, weight loading and linearization (imports torch and timm only)."""
from adala.models.build import build_vfm
from adala.models.linearize import attention_config, linearize
from adala.models.registry import VFMS, VFMSpec, check_img_size, get_vfm, list_vfms
from adala.models.weights import load_weights, read_export_metadata, save_export

__all__ = [
    "VFMS", "VFMSpec", "attention_config", "build_vfm", "check_img_size", "get_vfm", "linearize", "list_vfms",
    "load_weights", "read_export_metadata", "save_export",
]
