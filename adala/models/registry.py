"""The vision foundation models adala knows: the YAML entries of ``conf/model/``, resolved against timm.

A model is configuration. Each entry names a timm VisionTransformer (``timm_id``, ``timm_kwargs``) and its paper
settings (Stage-2 loss weight α, Stage-2 epochs); the fields it leaves null (patch size, native resolution,
normalisation) come from timm, read off the model built on the meta device (no weights, no memory).
:func:`model_spec` is the one place an entry, a composed ``cfg.model`` or any object with the same fields becomes
the :class:`VFMSpec` the code builds from; :func:`get_vfm` reads an entry by name for library use.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
import yaml
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from adala.config import ModelConfig
from adala.errors import UserError
from adala.paths import config_dir

TIMM_EXAMPLES = "vit_base_patch16_224.mae, deit_base_patch16_224, vit_large_patch14_dinov2.lvd142m"


@dataclass(frozen=True)
class VFMSpec:
    """A model entry with every field resolved: what :func:`adala.models.build_vfm` builds."""

    name: str
    timm_id: str
    description: str
    alpha: float  # weight of the Stage-2 feature-alignment MSE (paper Table 5)
    align_features_epochs: float  # paper's Stage-2 epochs on ImageNet-22K
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    native_img_size: int  # resolution of the pretrained weights
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


def model_dir() -> Path:
    return config_dir() / "model"


def list_vfms() -> list[str]:
    """The names of the model entries (``conf/model/*.yaml``)."""
    return sorted(path.stem for path in model_dir().glob("*.yaml"))


def get_vfm(name: str) -> VFMSpec:
    """The spec of entry ``name`` (``conf/model/<name>.yaml``)."""
    path = model_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_vfms())}")
    return model_spec(_model_config(yaml.safe_load(path.read_text()) or {}, source=str(path)))


def model_spec(config: Any) -> VFMSpec:
    """The spec of a model entry: a ``ModelConfig`` (a composed ``cfg.model``, with the user's overrides), any
    object with its fields, or a mapping of them (missing ones take ``ModelConfig``'s defaults). Fields left None
    are read from timm."""
    if isinstance(config, Mapping):
        config = _model_config(config, source="a model entry")
    if not config.timm_id:
        raise UserError(f"model {config.name}: model.timm_id is not set; name a timm VisionTransformer, "
                        f"e.g. model=timm model.timm_id=vit_base_patch16_224.mae")
    timm_kwargs = dict(config.timm_kwargs or {})
    from_timm = _timm_facts(config.timm_id, json.dumps(timm_kwargs, sort_keys=True))
    resolved = {key: from_timm[key] if getattr(config, key) is None else getattr(config, key) for key in from_timm}
    for key in ("mean", "std"):
        if len(resolved[key]) != 3:
            raise UserError(f"model.{key} must be 3 numbers (one per RGB channel), got {list(resolved[key])}")
    return VFMSpec(
        name=config.name,
        timm_id=config.timm_id,
        description=config.description or "",
        alpha=float(config.alpha),
        align_features_epochs=float(config.align_features_epochs),
        mean=tuple(float(x) for x in resolved["mean"]),
        std=tuple(float(x) for x in resolved["std"]),
        patch_size=int(resolved["patch_size"]),
        native_img_size=int(resolved["native_img_size"]),
        timm_kwargs=timm_kwargs,
    )


def _model_config(entry: Mapping[str, Any], *, source: str) -> ModelConfig:
    try:
        return ModelConfig(**entry)
    except TypeError as err:
        raise UserError(f"{source}: {err}; the keys of a model entry are those of conf/model/timm.yaml") from None


def spec_dict(spec: VFMSpec) -> dict[str, Any]:
    """``spec`` as plain JSON-able values (exports record it; :func:`model_spec` reads it back)."""
    return {**dataclasses.asdict(spec), "mean": list(spec.mean), "std": list(spec.std)}


def check_img_size(spec: VFMSpec, img_size: int) -> None:
    """Any positive resolution works: one that is not a multiple of the patch size is padded to whole patches
    (see :func:`adala.models.build.create_kwargs`)."""
    if img_size <= 0:
        raise UserError(f"resolution {img_size} is not a positive number of pixels; use e.g. {spec.native_img_size}")


@functools.lru_cache(maxsize=None)
def _timm_facts(timm_id: str, timm_kwargs_json: str) -> dict[str, Any]:
    """Patch size, native resolution and normalisation of a timm VisionTransformer, built on the meta device."""
    arch = timm_id.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.7)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown timm model {timm_id!r} (model.timm_id); {hint}"
                        f"timm.list_models('*vit*') lists the names, e.g. {TIMM_EXAMPLES}")
    try:
        with torch.device("meta"):
            model = timm.create_model(timm_id, pretrained=False, **json.loads(timm_kwargs_json))
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:  # a bad tag or keyword argument
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise UserError(f"timm cannot build {timm_id} with model.timm_kwargs={json.loads(timm_kwargs_json)}: "
                        f"{reason}") from None
    if not isinstance(model, VisionTransformer):
        raise UserError(f"{timm_id} is a timm {type(model).__name__}, not a VisionTransformer; adala linearizes "
                        f"timm VisionTransformer models, e.g. {TIMM_EXAMPLES}")
    other = {type(block.attn).__name__ for block in model.blocks if not _plain_attention(block.attn)}
    if other:
        raise UserError(f"{timm_id}'s blocks use {', '.join(sorted(other))}, not timm's Attention, which adala "
                        f"linearizes; choose a VisionTransformer with standard attention, e.g. {TIMM_EXAMPLES}")
    cfg = model.pretrained_cfg
    return {
        "mean": cfg["mean"],
        "std": cfg["std"],
        "patch_size": model.patch_embed.patch_size[0],
        "native_img_size": model.patch_embed.img_size[0],
    }


def _plain_attention(attn: Any) -> bool:
    return isinstance(attn, Attention) and getattr(attn, "gate", None) is None
