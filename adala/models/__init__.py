"""Model entries (``conf/model/*.yaml``), building, weight loading and linearization (imports torch and timm only)."""
from adala.models.build import build_vfm, create_kwargs, normalise_attention, token_layout
from adala.models.linearize import attention_config, linearize
from adala.models.registry import VFMSpec, check_img_size, get_vfm, list_vfms, model_spec, spec_dict
from adala.models.weights import load_weights, read_export_metadata, save_export

__all__ = [
    "VFMSpec", "attention_config", "build_vfm", "check_img_size", "create_kwargs", "get_vfm", "linearize",
    "list_vfms", "load_weights", "model_spec", "normalise_attention", "read_export_metadata", "save_export",
    "spec_dict", "token_layout",
]
