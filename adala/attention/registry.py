"""The registry of drop-in attentions: ``attention=<name>`` in configs, ``attn_layer="adala_<name>"`` in timm."""
from __future__ import annotations

from timm.models.vision_transformer import ATTN_LAYERS

from adala.attention.plug import AttentionPlug

PLUGS: dict[str, type[AttentionPlug]] = {}
TIMM_PREFIX = "adala_"


def register(cls: type[AttentionPlug]) -> type[AttentionPlug]:
    """Class decorator: make ``cls`` selectable by its ``name`` and buildable by timm as ``adala_<name>``."""
    if cls.name in PLUGS and PLUGS[cls.name] is not cls:
        raise ValueError(f"attention {cls.name!r} is registered twice")
    PLUGS[cls.name] = cls
    ATTN_LAYERS[TIMM_PREFIX + cls.name] = cls
    return cls


def get_plug(name: str) -> type[AttentionPlug]:
    """The plug class called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PLUGS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; use one of {', '.join(sorted(PLUGS))}") from None
