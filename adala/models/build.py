"""Build a VFM at any resolution, with weights from a local file and softmax or linear attention.

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

from adala.attention import DEFAULT_EPS, get_kernel
from adala.errors import UserError
from adala.models.linearize import attention_config, linearize
from adala.models.registry import VFMSpec, check_img_size, get_vfm
from adala.models.weights import load_weights, read_export_metadata

log = logging.getLogger(__name__)

SOFTMAX = {"kind": "softmax"}


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
    ``attention``: ``{"kind": "softmax"}`` or ``{"kind": "linear", "kernel": "elu1", "eps": 1e-6}``; None takes
    what the weights hold (an export's metadata or a file's linear-attention entries; softmax otherwise). Softmax
    weights may be linearized on request; weights trained with linear attention cannot go back to softmax.
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
    if stored["kind"] == "linear":
        linearize(vit, kernel=stored["kernel"], eps=stored["eps"])
    if weights is not None:
        load_weights(vit, weights, model_name=spec.name)  # a file holding linear attention linearizes the model
        _refuse_other_linear(weights, attention_config(vit), requested)
    if requested is not None and requested["kind"] == "linear" and attention_config(vit)["kind"] == "softmax":
        linearize(vit, kernel=requested["kernel"], eps=requested["eps"])
    layout = token_layout(vit, img_size)
    log.info("%s with %s at %d²: %d×%d patches of %d px%s, %d tokens", spec.name,
             _describe(attention_config(vit)), img_size, *layout["grid"], spec.patch_size,
             f" (padded to {layout['grid'][0] * spec.patch_size}²)" if img_size % spec.patch_size else "",
             layout["tokens"])
    return vit


def _refuse_other_linear(weights: Any, stored: dict[str, Any], requested: Optional[dict[str, Any]]) -> None:
    if stored["kind"] == "linear" and requested is not None and requested != stored:
        raise UserError(
            f"weights {weights} were trained with {_describe(stored)}, but {_describe(requested)} was asked for; "
            f"drop the attention override or set attention.kernel={stored['kernel']} attention.eps={stored['eps']:g}"
        )


def normalise_attention(attention: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``{"kind": "softmax"}`` or ``{"kind": "linear", "kernel", "eps"}`` with defaults filled in (None stays None);
    an unknown kind or kernel is a :class:`UserError`."""
    if attention is None:
        return None
    kind = attention.get("kind", "linear")
    if kind == "softmax":
        return dict(SOFTMAX)
    if kind != "linear":
        raise UserError(f"unknown attention kind {kind!r}; use attention=elu1 (linear) or attention=softmax")
    kernel = attention.get("kernel", "elu1")
    try:
        get_kernel(kernel)
    except ValueError as err:
        raise UserError(str(err)) from None
    return {"kind": "linear", "kernel": kernel, "eps": float(attention.get("eps", DEFAULT_EPS))}


def _describe(attention: dict[str, Any]) -> str:
    if attention["kind"] == "softmax":
        return "softmax attention"
    return f"linear attention ({attention['kernel']}, eps={attention['eps']:g})"


__all__ = ["attention_config", "build_vfm", "create_kwargs", "normalise_attention", "token_layout"]
