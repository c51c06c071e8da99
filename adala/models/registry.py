"""The vision foundation models adala knows: timm id, Stage-2 loss weight α, normalisation and patch size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from adala.errors import UserError

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VFMSpec:
    name: str
    timm_id: str
    alpha: float  # weight of the Stage-2 feature-alignment MSE (paper Table 5)
    align_features_epochs: int  # paper's Stage-2 epochs on ImageNet-22K
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    img_size: int  # native resolution of the pretrained weights
    description: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


def _dinov2(size: str, registers: bool) -> VFMSpec:
    width = {"s": "small", "b": "base", "l": "large"}[size]
    reg = "_reg4" if registers else ""
    return VFMSpec(
        name=f"dinov2{reg}_{size}",
        timm_id=f"vit_{width}_patch14{reg}_dinov2.lvd142m",
        alpha=5.0,
        align_features_epochs=30,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        patch_size=14,
        img_size=518,
        description=f"DINOv2 ViT-{size.upper()}/14{' with 4 registers' if registers else ''}",
    )


_SPECS = [
    *(_dinov2(size, reg) for reg in (False, True) for size in ("s", "b", "l")),
    VFMSpec(
        name="clip_l",
        timm_id="vit_large_patch14_clip_224.openai",
        alpha=4000.0,
        align_features_epochs=15,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        patch_size=14,
        img_size=224,
        description="OpenAI CLIP ViT-L/14 image tower",
    ),
    VFMSpec(
        name="siglip_l",
        timm_id="vit_large_patch16_siglip_256.webli",
        alpha=1.0,
        align_features_epochs=10,
        mean=HALF,
        std=HALF,
        patch_size=16,
        img_size=256,
        description="SigLIP ViT-L/16 image tower",
    ),
    VFMSpec(
        name="vit_l_in1k",
        timm_id="vit_large_patch16_224.augreg_in21k_ft_in1k",
        alpha=1.0,
        align_features_epochs=20,
        mean=HALF,
        std=HALF,
        patch_size=16,
        img_size=224,
        description="supervised ViT-L/16, ImageNet-21K pretrained, ImageNet-1K fine-tuned",
    ),
    VFMSpec(
        name="demo_tiny",
        timm_id="vit_tiny_patch16_224",
        alpha=1.0,
        align_features_epochs=1,
        mean=HALF,
        std=HALF,
        patch_size=4,
        img_size=32,
        description="tiny ViT for the built-in demo (64 wide, 4 blocks, 4 heads, 4×4 patches)",
        timm_kwargs=dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    ),
    VFMSpec(
        name="demo_small",
        timm_id="vit_tiny_patch16_224",
        alpha=1.0,
        align_features_epochs=1,
        mean=HALF,
        std=HALF,
        patch_size=4,
        img_size=32,
        description="a second small demo ViT, for sweeps over several models (96 wide, 3 blocks, 6 heads, 4×4 patches)",
        timm_kwargs=dict(patch_size=4, embed_dim=96, depth=3, num_heads=6, mlp_ratio=2.0),
    ),
]

VFMS: dict[str, VFMSpec] = {spec.name: spec for spec in _SPECS}


def list_vfms() -> list[str]:
    return list(VFMS)


def get_vfm(name: str) -> VFMSpec:
    try:
        return VFMS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(VFMS)}") from None


def check_img_size(spec: VFMSpec, img_size: int) -> None:
    if img_size <= 0 or img_size % spec.patch_size:
        lower = max(spec.patch_size, img_size - img_size % spec.patch_size)
        raise UserError(
            f"resolution {img_size} is not a multiple of {spec.name}'s patch size {spec.patch_size}; "
            f"use e.g. {lower} or {lower + spec.patch_size}"
        )
