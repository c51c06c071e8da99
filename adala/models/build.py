"""Build a VFM at any resolution, with weights from a local file and softmax attention or any plug.

Resolution policy: any positive image size works. A size that is not a multiple of the patch size is padded with
zeros at the bottom and right to whole patches (timm's ``dynamic_img_pad``): DINOv2 ViT-L/14 at 512² sees a
37 × 37 grid covering 518², 1369 patch tokens and the class token, 1370 in all. The model is built for the padded
size (its position embeddings cover the padded grid) with ``dynamic_img_size``, which lets it take the unpadded
images; :func:`create_kwargs` gives these timm arguments, so plain timm builds the same model.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import timm
from torch import nn

from adala.errors import UserError
from adala.models.linearize import attention_config, linearize
from adala.models.registry import VFMSpec, check_img_size, get_vfm
from adala.models.spec import SOFTMAX, describe, normalise_attention, overrides, settled_by
from adala.models.weights import load_weights, read_export_metadata

log = logging.getLogger(__name__)


def create_kwargs(spec: VFMSpec, img_size: int, num_classes: int = 0) -> dict[str, Any]:
    """The ``timm.create_model`` arguments (besides ``spec.timm_id``) of ``spec`` for images of ``img_size``²."""
    grid = math.ceil(img_size / spec.patch_size)
    kwargs = {**spec.timm_kwargs, "img_size": grid * spec.patch_size, "num_classes": num_classes}
    if img_size % spec.patch_size:
        kwargs.update(dynamic_img_pad=True, dynamic_img_size=True)
    return kwargs


def token_layout(model: nn.Module, img_size: int) -> dict[str, Any]:
    """How a built ViT sees images of ``img_size``²: ``grid`` (patch rows, columns) and ``tokens`` (patches
    plus class and register tokens), as exports record them."""
    rows, cols = model.patch_embed.dynamic_feat_size((img_size, img_size))
    return {"img_size": img_size, "grid": [rows, cols], "tokens": rows * cols + model.num_prefix_tokens}


def build_vfm(
    model: str | VFMSpec,
    *,
    img_size: Optional[int] = None,
    weights: Optional[str | os.PathLike] = None,
    num_classes: int = 0,
    attention: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Create ``model`` (an entry's name, or a spec from :func:`~adala.models.model_spec`) as a timm
    VisionTransformer for images of ``img_size``² (default: the native resolution).

    ``weights``: a local file (see :mod:`adala.models.weights`); None keeps timm's random initialisation.
    ``attention``: a spec (:mod:`adala.models.spec`), e.g. ``{"kind": "softmax"}`` or ``{"kind": "linear",
    "kernel": "elu1"}``; None takes what the weights hold (an export's metadata or a file's plug entries; softmax
    otherwise). Softmax weights get any plug on request; weights trained with a plug keep it (and its settings).
    """
    spec = get_vfm(model) if isinstance(model, str) else model
    img_size = img_size or spec.native_img_size
    check_img_size(spec, img_size)
    requested = normalise_attention(attention)
    stored = SOFTMAX
    if weights is not None:
        meta = read_export_metadata(weights)
        if meta is not None:
            if meta.get("model") not in (None, spec.name):
                raise UserError(f"weights {weights} were exported from {meta['model']}, not {spec.name}; "
                                f"set model={meta['model']}")
            stored = normalise_attention(meta.get("attention")) or SOFTMAX
    _refuse_other_linear(weights, stored, requested)
    vit = timm.create_model(spec.timm_id, pretrained=False, **create_kwargs(spec, img_size, num_classes))
    if stored["kind"] != "softmax":
        _linearize(vit, stored)
    if weights is not None:
        load_weights(vit, weights, model_name=spec.name)  # a file holding plugs' entries puts the plugs in
        _refuse_other_linear(weights, attention_config(vit), requested)
    if requested is not None and requested["kind"] != "softmax" and attention_config(vit)["kind"] == "softmax":
        _linearize(vit, requested)
    layout = token_layout(vit, img_size)
    log.info("%s with %s at %d²: %d×%d patches of %d px%s, %d tokens", spec.name,
             describe(attention_config(vit)), img_size, *layout["grid"], spec.patch_size,
             f" (padded to {layout['grid'][0] * spec.patch_size}²)" if img_size % spec.patch_size else "",
             layout["tokens"])
    return vit


def _linearize(vit: nn.Module, attention: dict[str, Any]) -> None:
    try:
        linearize(vit, attention)
    except ValueError as err:  # e.g. softmax_blocks beyond the model's depth
        raise UserError(str(err)) from None


def _refuse_other_linear(weights: Any, stored: dict[str, Any], requested: Optional[dict[str, Any]]) -> None:
    requested = settled_by(requested, stored)
    if stored["kind"] != "softmax" and requested is not None and requested != stored:
        raise UserError(
            f"weights {weights} were trained with {describe(stored)}, but {describe(requested)} was asked for; "
            f"drop the attention override or set {' '.join(overrides(stored))}"
        )


__all__ = ["attention_config", "build_vfm", "create_kwargs", "normalise_attention", "token_layout"]
