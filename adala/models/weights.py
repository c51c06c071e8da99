"""Load a local weight file into a timm ViT and write adala's exports.

Accepted files: timm checkpoints (``.pth``/``.pt``/``.bin``, optionally under ``model``/``state_dict``),
``.safetensors`` (timm keys, or adala exports with their metadata), the original DINOv2 and OpenAI-CLIP layouts
(converted by timm's ``checkpoint_filter_fn``) and big_vision ``.npz`` files (SigLIP, AugReg; timm's loader).
Position and patch embeddings are resampled when the file was trained at another resolution.

A file whose blocks carry a plug's config entry (``attn.plug_config``, or ``attn.linear_config`` of
:class:`~adala.attention.LinearAttention`) puts that plug, with its stored settings, into those softmax blocks
before it loads; a linear model takes files without the entry too (softmax weights, or exports written before the
entry existed, whose metadata name the attention).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from adala.attention import AttentionPlug, LinearAttention, get_plug
from adala.attention.module import decode_config
from adala.attention.plug import PLUG_BUFFER, decode_json
from adala.errors import UserError
from adala.models.linearize import convert_block, track_token_layout

METADATA_KEY = "adala"
# Task heads that may sit in a file and are not part of the backbone (Stage-3 exports).
TASK_HEAD_PREFIXES = ("head.", "seg_head.")
EXPORT_FORMAT = 1
CONFIG_ENTRIES = (f".attn.{PLUG_BUFFER}", f".attn.{LinearAttention.config_buffer}")


def require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found; set model.weights to an existing checkpoint")
    return path


def read_export_metadata(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The adala metadata of an export, or None for any other file."""
    if not require_file(path).suffix == ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise UserError(f"cannot read weights {path}: {err}; the file is damaged or not a safetensors file") from None
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise UserError(f"cannot read weights {path}: {err}; the file is damaged or not a safetensors file") from None
    try:
        if is_torchscript(path):  # OpenAI's CLIP releases are TorchScript archives of the whole model
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, ...
        raise UserError(f"cannot read weights {path}: {err}; pass a .safetensors, .pth or .npz file") from None
    if not isinstance(state, Mapping):
        raise UserError(f"weights {path} hold a {type(state).__name__}, not a state dict")
    return dict(state)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled code beside the tensors)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str = "model") -> None:
    """Load ``path`` into ``model`` strictly, except for task heads the model does not have or has resized."""
    path = require_file(path)
    if path.suffix == ".npz":
        try:
            model.load_pretrained(str(path))
        except Exception as err:
            raise UserError(f"weights {path} do not fit {model_name}: {err}") from None
        return
    state = checkpoint_filter_fn(read_state_dict(path), model)
    _linearize_as_stored(model, state, path)
    own = model.state_dict()
    state = {
        k: v for k, v in state.items()
        if not (k.startswith(TASK_HEAD_PREFIXES) and (k not in own or own[k].shape != v.shape))
    }
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(TASK_HEAD_PREFIXES)
               and not k.endswith(CONFIG_ENTRIES)]  # kept as built: see the module docstring
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        raise UserError(
            f"weights {path} do not fit {model_name}: "
            + "; ".join(
                f"{len(keys)} {what} ({_some(keys)})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                if keys
            )
            + " — check that model= names the architecture these weights belong to"
        )
    model.load_state_dict(state, strict=False)


def _linearize_as_stored(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Put into each softmax block the plug (and settings) that ``state`` stores for it."""
    converted = False
    for index, block in enumerate(getattr(model, "blocks", ())):
        if isinstance(block.attn, AttentionPlug):
            continue
        for entry in CONFIG_ENTRIES:
            stored = state.get(f"blocks.{index}{entry}")
            if stored is not None:
                try:
                    plug, settings = _stored_plug(stored, entry)
                    convert_block(model, index, plug, settings)
                except ValueError as err:
                    raise UserError(f"weights {path}: blocks.{index}{entry}: {err}") from None
                converted = True
    if converted:
        track_token_layout(model)


def _stored_plug(stored: torch.Tensor, entry: str) -> tuple[type[AttentionPlug], dict[str, Any]]:
    if entry.endswith(LinearAttention.config_buffer):
        return LinearAttention, decode_config(stored)
    config = decode_json(stored)
    plug = get_plug(str(config.pop("name", None)))
    config.pop("num_prefix_tokens", None)  # the model's own layout is set after conversion
    return plug, plug.check_settings(config)


def save_export(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any]
) -> Path:
    """Write ``state`` as one safetensors file with adala metadata, atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {METADATA_KEY: json.dumps({"format": EXPORT_FORMAT, **metadata}, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _some(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
