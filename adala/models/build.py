"""Build a registered VFM at any resolution, with weights from a local file and softmax or linear attention."""
from __future__ import annotations

import os
from typing import Any, Optional

import timm
from torch import nn

from adala.attention import DEFAULT_EPS, get_kernel
from adala.errors import UserError
from adala.models.linearize import attention_config, linearize
from adala.models.registry import check_img_size, get_vfm
from adala.models.weights import load_weights, read_export_metadata

SOFTMAX = {"kind": "softmax"}


def build_vfm(
    name: str,
    *,
    img_size: Optional[int] = None,
    weights: Optional[str | os.PathLike] = None,
    num_classes: int = 0,
    attention: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Create registry model ``name`` as a timm VisionTransformer.

    ``weights``: a local file (see :mod:`adala.models.weights`); None keeps timm's random initialisation.
    ``attention``: ``{"kind": "softmax"}`` or ``{"kind": "linear", "kernel": "elu1", "eps": 1e-6}``; None takes
    what an adala export says it holds (softmax for any other file). Softmax weights may be linearized on request;
    weights trained with linear attention cannot go back to softmax.
    """
    spec = get_vfm(name)
    img_size = img_size or spec.img_size
    check_img_size(spec, img_size)
    requested = _normalise(attention)
    stored = SOFTMAX
    if weights is not None:
        meta = read_export_metadata(weights)
        if meta is not None:
            if meta.get("model") not in (None, name):
                raise UserError(f"weights {weights} were exported from {meta['model']}, not {name}; set model={meta['model']}")
            stored = _normalise(meta.get("attention")) or SOFTMAX
    if stored["kind"] == "linear" and requested is not None and requested != stored:
        raise UserError(
            f"weights {weights} were trained with {_describe(stored)}, but {_describe(requested)} was asked for; "
            f"drop the attention override or set attention.kernel={stored['kernel']} attention.eps={stored['eps']:g}"
        )
    model = timm.create_model(spec.timm_id, pretrained=False, img_size=img_size, num_classes=num_classes, **spec.timm_kwargs)
    if stored["kind"] == "linear":
        linearize(model, kernel=stored["kernel"], eps=stored["eps"])
    if weights is not None:
        load_weights(model, weights, model_name=name)
    if requested is not None and requested["kind"] == "linear" and stored["kind"] == "softmax":
        linearize(model, kernel=requested["kernel"], eps=requested["eps"])
    return model


def _normalise(attention: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if attention is None:
        return None
    kind = attention.get("kind", "linear")
    if kind == "softmax":
        return dict(SOFTMAX)
    if kind != "linear":
        raise UserError(f"unknown attention kind {kind!r}; use softmax or linear")
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


__all__ = ["build_vfm", "attention_config"]
