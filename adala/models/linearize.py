"""Swap the blocks' softmax attention for a plug (:mod:`adala.attention`), weights preserved, and describe what
a model's blocks use (:func:`attention_config`, the spec exports record)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from timm.layers import Attention
from torch import nn

from adala.attention import AttentionPlug, get_plug
from adala.models.spec import SOFTMAX, normalise_attention, plug_settings


def linearize(model: nn.Module, attention: Optional[str | Mapping[str, Any]] = None, **settings: Any) -> nn.Module:
    """Replace ``model.blocks[i].attn`` (timm ``Attention``) by the plug ``attention`` names, in place; returns
    ``model``.

    ``attention``: a spec (see :mod:`adala.models.spec`), a plug name, or None for ``linear``; ``settings``
    override the spec's (``linearize(model, kernel="relu")``). Blocks listed in the spec's ``softmax_blocks``
    keep softmax; blocks that already use the plug are left alone. Settings left to the model (e.g. Linformer's
    grid) are filled in from its patch grid. Other attention modules (e.g. SigLIP's pooling head) are not part of
    the token mixer and stay softmax. The plugs learn the model's token layout
    (prefix tokens, patch grid), kept current for each input size by :func:`track_token_layout`.
    """
    blocks = _blocks(model)
    if attention is None or isinstance(attention, str):
        attention = {"kind": attention or "linear"}
    spec = normalise_attention({**attention, **settings})
    if spec["kind"] == "softmax":
        raise ValueError("linearize needs a plug, not softmax attention")
    keep = spec.get("softmax_blocks", [])
    if keep and keep[-1] >= len(blocks):
        raise ValueError(f"attention.softmax_blocks={keep}: the model has blocks 0 to {len(blocks) - 1}")
    plug, settings = plug_for(model, spec)
    for index in set(range(len(blocks))) - set(keep):
        convert_block(model, index, plug, settings)
    track_token_layout(model)
    return model


def plug_for(model: nn.Module, spec: Mapping[str, Any]) -> tuple[type[AttentionPlug], dict[str, Any]]:
    """The plug ``spec`` names and its settings for ``model``: those left to the model (e.g. Linformer's grid)
    filled in from its patch grid."""
    plug = get_plug(spec["kind"])
    return plug, plug.settings_for_model(plug_settings(spec), tuple(model.patch_embed.grid_size))


def convert_block(model: nn.Module, index: int, plug: type[AttentionPlug], settings: dict[str, Any]) -> None:
    """Make block ``index`` use ``plug`` with ``settings``, from its softmax weights; a no-op when it already does."""
    attn = model.blocks[index].attn
    if isinstance(attn, plug):
        return
    if not isinstance(attn, Attention):
        raise TypeError(f"block {index} uses {type(attn).__name__}; only timm's Attention can be replaced by a plug")
    model.blocks[index].attn = plug.from_softmax(attn, **settings)


class GridTracker:
    """A forward pre-hook on ``patch_embed``: tells every plug the patch grid of the images coming in.

    A callable object rather than a closure so that ``copy.deepcopy`` of the model points it at the copy's blocks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.patch_embed = model.patch_embed
        self.blocks = model.blocks

    def __call__(self, module: nn.Module, args: tuple) -> None:
        grid = tuple(self.patch_embed.dynamic_feat_size(args[0].shape[-2:]))
        for block in self.blocks:
            if isinstance(block.attn, AttentionPlug):
                block.attn.grid = grid


def track_token_layout(model: nn.Module) -> None:
    """Give every plug of ``model`` its prefix-token count and patch grid, and keep the grid current for each
    input size (a :class:`GridTracker` on ``model.patch_embed``, registered once)."""
    grid = tuple(model.patch_embed.grid_size)
    for block in _blocks(model):
        if isinstance(block.attn, AttentionPlug):
            block.attn.set_token_layout(model.num_prefix_tokens, grid)
    hooks = model.patch_embed._forward_pre_hooks.values()
    if not any(isinstance(hook, GridTracker) for hook in hooks):
        model.patch_embed.register_forward_pre_hook(GridTracker(model))


def attention_config(model: nn.Module) -> dict[str, Any]:
    """What attention the blocks of ``model`` use, as a spec (exports record it): ``{"kind": "softmax"}`` or
    ``{"kind": <plug>, <settings>..., ["softmax_blocks": [...]]}``."""
    blocks = _blocks(model)
    plugs = {i: b.attn for i, b in enumerate(blocks) if isinstance(b.attn, AttentionPlug)}
    if not plugs:
        return dict(SOFTMAX)
    kinds = {json.dumps({"kind": p.name, **p.settings}, sort_keys=True) for p in plugs.values()}
    if len(kinds) > 1:
        raise ValueError(f"model mixes attention plugs or settings across blocks: {sorted(kinds)}")
    first = next(iter(plugs.values()))
    softmax = sorted(set(range(len(blocks))) - set(plugs))
    return {"kind": first.name, **first.settings, **({"softmax_blocks": softmax} if softmax else {})}


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks; linearize expects a timm VisionTransformer")
    return blocks


__all__ = ["GridTracker", "attention_config", "convert_block", "linearize", "plug_for", "track_token_layout"]
