"""The attention spec: which attention a model's blocks use, as configs, stages and exports pass it around.

``{"kind": "softmax"}``, or ``{"kind": <plug name>, <each of the plug's settings>: value, ...}`` with every
setting filled in, plus ``"softmax_blocks": [i, ...]`` when some blocks keep softmax attention (a hybrid model).
Linear exports written before the plugs (``{"kind": "linear", "kernel", "eps"}``) are specs of this form already.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from adala.attention import get_plug
from adala.attention.registry import PLUGS
from adala.errors import UserError

SOFTMAX = {"kind": "softmax"}
RESERVED = ("kind", "softmax_blocks")  # spec keys that are not a plug's settings
STAND_IN_GRID = (2, 2)  # a patch grid for checking settings left to the model before there is one


def normalise_attention(attention: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """``attention`` as a spec with defaults filled in (None stays None); an unknown attention or setting, or a
    setting its plug refuses, is a one-line :class:`UserError`."""
    if attention is None:
        return None
    kind = attention.get("kind", "linear")
    blocks = _softmax_blocks(attention.get("softmax_blocks") or [])
    settings = {key: value for key, value in attention.items() if key not in RESERVED}
    if kind == "softmax":
        if settings or blocks:
            raise UserError(f"softmax attention has no settings ({', '.join(sorted(settings)) or 'softmax_blocks'}); "
                            "drop them, or choose a plug, e.g. attention=linear")
        return dict(SOFTMAX)
    try:
        plug = get_plug(kind)
    except ValueError:
        raise UserError(f"unknown attention {kind!r}; use attention=softmax or one of: "
                        f"{', '.join(sorted(PLUGS))}") from None
    try:
        settings = plug.check_settings(settings)
        with torch.device("meta"):  # the plug's own checks of its settings, without allocating anything
            plug(64, 1, **plug.settings_for_model(settings, STAND_IN_GRID))
    except (ValueError, TypeError) as err:
        raise UserError(f"attention={kind}: {err}") from None
    return {"kind": kind, **settings, **({"softmax_blocks": blocks} if blocks else {})}


def _softmax_blocks(blocks: Any) -> list[int]:
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in blocks):
        raise UserError(f"attention.softmax_blocks must be a list of block indices, e.g. [20,21,22,23]; got {blocks}")
    return sorted(set(blocks))


def settled_by(requested: Optional[Mapping[str, Any]], stored: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """``requested`` with the settings it leaves to the model (e.g. Linformer's grid) taken from ``stored``, the
    spec of weights already converted for a model, when both name the same plug; otherwise ``requested``."""
    if requested is None or requested["kind"] == "softmax" or requested["kind"] != stored["kind"]:
        return None if requested is None else dict(requested)
    settings = plug_settings(requested)
    filled = get_plug(requested["kind"]).settings_for_model(settings, STAND_IN_GRID)
    left = [key for key, value in filled.items() if settings.get(key) != value and key in stored]
    return {**requested, **{key: stored[key] for key in left}}


def plug_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The plug's settings in ``spec`` (everything but its kind and softmax blocks)."""
    return {key: value for key, value in spec.items() if key not in RESERVED}


def describe(spec: Mapping[str, Any]) -> str:
    """``spec`` in words, for logs and errors."""
    if spec["kind"] == "softmax":
        return "softmax attention"
    settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(plug_settings(spec).items()))
    hybrid = f", softmax in blocks {spec['softmax_blocks']}" if spec.get("softmax_blocks") else ""
    return f"{spec['kind']} attention" + (f" ({settings})" if settings else "") + hybrid


def overrides(spec: Mapping[str, Any]) -> list[str]:
    """The command-line overrides that select ``spec``: ``attention=<kind>`` and one ``attention.<key>=`` each."""
    items = [f"attention={spec['kind']}"]
    items += [f"attention.{key}={_override_value(value)}" for key, value in sorted(plug_settings(spec).items())]
    if spec.get("softmax_blocks"):
        items.append(f"attention.softmax_blocks={_override_value(spec['softmax_blocks'])}")
    return items


def _override_value(value: Any) -> str:
    """``value`` as a Hydra override writes it (null, true/false, [a,b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    return str(value)
