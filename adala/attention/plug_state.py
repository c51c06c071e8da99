"""Loading weights into a plug whose own tensors have setting-dependent shapes (feature dims, feature counts).

:class:`~adala.attention.plug.AttentionPlug` restores a plug's settings from the config buffer entry of the
weights being loaded, but its tensors were built with the settings it was constructed with. Before the copy,
:func:`fit_plug_tensors` gives the plug's own parameters and buffers the shapes stored in the weights, so a plug
built with the defaults loads weights trained with other settings. timm's tensors (qkv, norms, proj) are left alone:
a mismatch there still fails the load.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping

import torch

from adala.attention.plug import AttentionPlug

TIMM_TENSORS = ("qkv.", "q_norm.", "k_norm.", "norm.", "proj.")


def fit_plug_tensors(module: AttentionPlug, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Resize (in place, keeping each Parameter object) the plug's own tensors whose stored shape differs."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if name.startswith(TIMM_TENSORS) or name == module.config_buffer:
            continue
        stored = state_dict.get(prefix + name)
        if isinstance(stored, torch.Tensor) and not stored.is_meta and stored.shape != tensor.shape:
            tensor.data = torch.empty(stored.shape, dtype=tensor.dtype, device=tensor.device)
