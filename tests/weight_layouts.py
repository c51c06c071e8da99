"""Weight files in the layouts pretrained releases are published in, written from timm VisionTransformers.

Users keep the original files on shared storage: DINOv2's torch-hub ``.pth``, OpenAI's CLIP checkpoint (a state
dict, or the TorchScript archive OpenAI distributes), big_vision ``.npz`` (SigLIP), the original ViT's AugReg
``.npz`` and timm's own ``.safetensors``/``.pth``. Each writer here is the inverse of the conversion timm applies
when it loads that layout (``checkpoint_filter_fn`` for state dicts, ``_load_weights`` for ``.npz``), and refuses a
model holding a parameter the layout has no place for, so a file written from a randomly initialised model of the
real architecture has the release's key names, nesting and shapes, and loading it must give back the model.

``RELEASES`` names the real architecture behind each registry model's original file (CLIP: QuickGELU, as OpenAI
trained it); ``write_release`` writes one of those at full size for the README's commands.
"""
from __future__ import annotations

import ast
import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

State = dict[str, torch.Tensor]


def timm_state(model: nn.Module) -> State:
    """The model's state dict as detached, contiguous CPU tensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def cast(state: State, dtype: Optional[torch.dtype]) -> State:
    """``state`` with its floating-point tensors in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return state
    return {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in state.items()}


class _Consumer:
    """Hands out a timm state dict key by key; ``finish`` fails on keys no rule took (the layout cannot hold them)."""

    def __init__(self, state: State, layout: str) -> None:
        self.state, self.layout, self.taken = state, layout, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ValueError(f"the {self.layout} layout needs {key}, which this model does not have; "
                             "it is not of that family")
        self.taken.add(key)
        return self.state[key]

    def get(self, key: str) -> Optional[torch.Tensor]:
        """``key``'s tensor if the model has it (an optional part: registers, a head), else None."""
        return self(key) if key in self.state else None

    def finish(self) -> None:
        left = sorted(set(self.state) - self.taken)
        if left:
            raise ValueError(f"the {self.layout} layout has no place for {', '.join(left[:5])}"
                             f"{' ...' if len(left) > 5 else ''}; this model is not of that family")


def _blocks(model: nn.Module) -> range:
    return range(len(model.blocks))


# --- timm's own files -------------------------------------------------------------------------------------------

def write_timm(model: nn.Module, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None) -> Path:
    """timm's key names as they are: ``.safetensors``, or a plain ``torch.save``d state dict for any other suffix."""
    path = Path(path)
    state = cast(timm_state(model), dtype)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# --- DINOv2 torch hub ---------------------------------------------------------------------------------------------

def dinov2_hub_state(model: nn.Module) -> State:
    """facebookresearch/dinov2's ``dinov2_vit*14[_reg4]_pretrain.pth``: timm's names plus ``mask_token``
    (1, D); with registers ``register_tokens`` and a position for the class token inside ``pos_embed``
    (timm folds that position into ``cls_token``; here it is split out again, so the file has 1 + grid² positions)."""
    take = _Consumer(timm_state(model), "DINOv2 hub")
    out: State = {}
    reg_token = take.get("reg_token")
    cls_token, pos_embed = take("cls_token"), take("pos_embed")
    if reg_token is not None:
        cls_pos = torch.randn(cls_token.shape, generator=torch.Generator().manual_seed(0)) * 0.02
        out["cls_token"], out["pos_embed"], out["register_tokens"] = cls_token - cls_pos, torch.cat([cls_pos, pos_embed], 1), reg_token
    else:
        out["cls_token"], out["pos_embed"] = cls_token, pos_embed
    out["mask_token"] = torch.zeros(1, cls_token.shape[-1])
    for key in list(take.state):
        if key.startswith(("patch_embed.", "blocks.", "norm.")):
            out[key] = take(key)
        elif key.startswith("head."):
            take(key)  # the hub file holds the backbone alone
    take.finish()
    return out


def write_dinov2_hub(model: nn.Module, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None) -> Path:
    torch.save(cast(dinov2_hub_state(model), dtype), path)
    return Path(path)


# --- OpenAI CLIP ----------------------------------------------------------------------------------------------------

_CLIP_BLOCK = {  # timm name inside blocks.N -> OpenAI name inside visual.transformer.resblocks.N
    "norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
CLIP_CONTEXT, CLIP_VOCAB = 77, 49408


def openai_clip_state(model: nn.Module, *, text_keys: bool = True) -> State:
    """OpenAI CLIP's state dict: the image tower under ``visual.`` (``conv1``, ``class_embedding``,
    ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,
    mlp.c_fc,mlp.c_proj}``, ``ln_post``, ``proj`` (D, E)), and with ``text_keys`` a few of the text tower's keys
    beside it (a loader must skip them); the text tower's blocks and token table are left out to keep files small."""
    take = _Consumer(timm_state(model), "OpenAI CLIP")
    visual: State = {
        "class_embedding": take("cls_token").reshape(-1),
        "positional_embedding": take("pos_embed")[0],
        "conv1.weight": take("patch_embed.proj.weight"),
        "ln_pre.weight": take("norm_pre.weight"), "ln_pre.bias": take("norm_pre.bias"),
    }
    for i in _blocks(model):
        for timm_name, clip_name in _CLIP_BLOCK.items():
            for suffix in ("",) if timm_name.endswith(("weight", "bias")) else (".weight", ".bias"):
                visual[f"transformer.resblocks.{i}.{clip_name}{suffix}"] = take(f"blocks.{i}.{timm_name}{suffix}")
    visual["ln_post.weight"], visual["ln_post.bias"] = take("norm.weight"), take("norm.bias")
    head, bias = take.get("head.weight"), take.get("head.bias")
    if bias is not None and bias.abs().max() > 0:
        raise ValueError("OpenAI CLIP's projection has no bias; this model's head has one")
    width = visual["class_embedding"].shape[0]
    proj = head.T if head is not None else torch.randn(width, width) * width ** -0.5
    visual["proj"] = proj.contiguous()
    take.finish()
    out = {f"visual.{k}": v for k, v in visual.items()}
    if text_keys:
        embed = proj.shape[1]
        out.update({
            "positional_embedding": torch.randn(CLIP_CONTEXT, embed) * 0.01,
            "text_projection": torch.randn(embed, embed) * embed ** -0.5,
            "ln_final.weight": torch.ones(embed), "ln_final.bias": torch.zeros(embed),
            "logit_scale": torch.tensor(math.log(1 / 0.07)),
        })
    return out


class _Node(nn.Module):
    """One level of a TorchScript archive's module tree (OpenAI's archives are scripted CLIP modules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_openai_clip(model: nn.Module, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                      torchscript: bool = False, text_keys: bool = True) -> Path:
    """A ``torch.save``d state dict (what open_clip and most mirrors keep), or with ``torchscript`` a TorchScript
    archive like OpenAI's own ``ViT-L-14.pt``, whose top level also holds ``input_resolution``,
    ``context_length`` and ``vocab_size``."""
    state = cast(openai_clip_state(model, text_keys=text_keys), dtype)
    if not torchscript:
        torch.save(state, path)
        return Path(path)
    size = model.patch_embed.img_size[0]
    root = _Node()
    for key, value in state.items():
        *parents, name = key.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, _Node())
            node = node._modules[part]
        node.register_parameter(name, nn.Parameter(value, requires_grad=False))
    for name, value in (("input_resolution", size), ("context_length", CLIP_CONTEXT), ("vocab_size", CLIP_VOCAB)):
        root.register_buffer(name, torch.tensor(value))
    torch.jit.script(root).save(str(path))
    return Path(path)


# --- JAX .npz: big_vision (SigLIP) and the original ViT (AugReg) -----------------------------------------------------

def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """timm (out, in) with out = heads x head_dim -> JAX DenseGeneral kernel (in, heads, head_dim)."""
    return weight.T.reshape(weight.shape[1], heads, -1)


def _attention(kernels: dict[str, torch.Tensor], biases: dict[str, torch.Tensor], out_w: torch.Tensor,
               out_b: torch.Tensor, heads: int, prefix: str) -> State:
    """A JAX MultiHeadDotProductAttention: query/key/value kernels (in, heads, head_dim), out (heads, head_dim, D)."""
    found: State = {}
    for name in ("query", "key", "value"):
        found[f"{prefix}{name}/kernel"] = _heads(kernels[name], heads)
        found[f"{prefix}{name}/bias"] = biases[name].reshape(heads, -1)
    found[f"{prefix}out/kernel"] = out_w.reshape(out_w.shape[0], heads, -1).permute(1, 2, 0)
    found[f"{prefix}out/bias"] = out_b
    return found


def _norm(take: _Consumer, timm_name: str, jax_name: str) -> State:
    return {f"{jax_name}/scale": take(f"{timm_name}.weight"), f"{jax_name}/bias": take(f"{timm_name}.bias")}


def _dense(take: _Consumer, timm_name: str, jax_name: str) -> State:
    return {f"{jax_name}/kernel": take(f"{timm_name}.weight").T, f"{jax_name}/bias": take(f"{timm_name}.bias")}


def jax_vit_state(model: nn.Module, *, big_vision: bool, scanned: bool = False) -> State:
    """The image tower as the JAX code names it, without the file's prefix.

    ``big_vision`` (SigLIP): ``pos_embedding``, blocks with ``LayerNorm_0/1``, ``MultiHeadDotProductAttention_0``,
    ``MlpBlock_0``, the MAP head as ``MAPHead_0``; otherwise the original ViT's names (``cls``,
    ``Transformer/posembed_input/pos_embedding``, ``LayerNorm_0/2``, ``MultiHeadDotProductAttention_1``,
    ``MlpBlock_3``). ``scanned``: one ``Transformer/encoderblock`` whose arrays are stacked over the blocks, as
    ``nn.scan`` saves them (SigLIP's released files); else ``Transformer/encoderblock_N``.
    """
    take = _Consumer(timm_state(model), "big_vision" if big_vision else "AugReg")
    top: State = {"embedding/kernel": take("patch_embed.proj.weight").permute(2, 3, 1, 0),
                  "embedding/bias": take("patch_embed.proj.bias")}
    cls = take.get("cls_token")
    if cls is not None:
        top["cls"] = cls
    top["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = take("pos_embed")
    top.update(_norm(take, "norm", "Transformer/encoder_norm"))
    attn_name, norm2_name, mlp_name = (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision
                                       else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
    blocks = []
    for i in _blocks(model):
        b = f"blocks.{i}."
        qkv_w, qkv_b = take(b + "attn.qkv.weight").chunk(3), take(b + "attn.qkv.bias").chunk(3)
        block = {**_norm(take, b + "norm1", "LayerNorm_0"), **_norm(take, b + "norm2", norm2_name),
                 **_dense(take, b + "mlp.fc1", f"{mlp_name}/Dense_0"), **_dense(take, b + "mlp.fc2", f"{mlp_name}/Dense_1"),
                 **_attention(dict(zip(("query", "key", "value"), qkv_w)), dict(zip(("query", "key", "value"), qkv_b)),
                              take(b + "attn.proj.weight"), take(b + "attn.proj.bias"), model.blocks[i].attn.num_heads,
                              f"{attn_name}/")}
        blocks.append(block)
    if scanned:
        top.update({f"Transformer/encoderblock/{k}": torch.stack([blk[k] for blk in blocks]) for k in blocks[0]})
    else:
        top.update({f"Transformer/encoderblock_{i}/{k}": v for i, blk in enumerate(blocks) for k, v in blk.items()})
    if getattr(model, "attn_pool", None) is not None:
        pool = model.attn_pool
        k_w, v_w = take("attn_pool.kv.weight").chunk(2)
        k_b, v_b = take("attn_pool.kv.bias").chunk(2)
        top["MAPHead_0/probe"] = take("attn_pool.latent")
        top.update(_norm(take, "attn_pool.norm", "MAPHead_0/LayerNorm_0"))
        top.update(_dense(take, "attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0"))
        top.update(_dense(take, "attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1"))
        top.update(_attention({"query": take("attn_pool.q.weight"), "key": k_w, "value": v_w},
                              {"query": take("attn_pool.q.bias"), "key": k_b, "value": v_b},
                              take("attn_pool.proj.weight"), take("attn_pool.proj.bias"), pool.num_heads,
                              "MAPHead_0/MultiHeadDotProductAttention_0/"))
    if take.get("head.weight") is not None:
        top.update({"head/kernel": take("head.weight").T, "head/bias": take("head.bias")})
    take.finish()
    return top


def write_big_vision(model: nn.Module, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                     scanned: bool = True) -> Path:
    """A big_vision SigLIP checkpoint: the image tower under ``params/img/`` (scanned blocks by default, as the
    released files are), with the model's ``params/t`` and ``params/b`` and a text-tower array beside it."""
    image = jax_vit_state(model, big_vision=True, scanned=scanned)
    width = image["embedding/bias"].shape[0]
    arrays = {f"params/img/{k}": v for k, v in image.items()}
    arrays.update({"params/t": torch.tensor([math.log(10.0)]), "params/b": torch.tensor([-10.0]),
                   "params/txt/Embed_0/embedding": torch.randn(64, width) * 0.02})  # a stand-in slice of the text tower
    _savez(path, arrays, dtype)
    return Path(path)


def write_augreg(model: nn.Module, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None) -> Path:
    """The original ViT's ``.npz`` (google-research/vision_transformer, AugReg): no prefix, one group per block."""
    _savez(path, jax_vit_state(model, big_vision=False), dtype)
    return Path(path)


def _savez(path: str | os.PathLike, arrays: State, dtype: Optional[torch.dtype]) -> None:
    with open(path, "wb") as file:  # np.savez would append .npz to a name without it
        np.savez(file, **{k: v.numpy() for k, v in cast(arrays, dtype).items()})


# --- the releases the README names ---------------------------------------------------------------------------------

Writer = Callable[..., Path]
LAYOUTS: dict[str, Writer] = {
    "timm": write_timm, "dinov2_hub": write_dinov2_hub, "openai_clip": write_openai_clip,
    "openai_clip_jit": lambda model, path, **kw: write_openai_clip(model, path, torchscript=True, **kw),
    "big_vision": write_big_vision, "augreg": write_augreg,
}


@dataclass(frozen=True)
class Release:
    """A pretrained release as published: the architecture (timm name, head size) and the layouts it comes in."""

    arch: str
    num_classes: int
    layouts: tuple[str, ...]


RELEASES: dict[str, Release] = {
    "dinov2_s": Release("vit_small_patch14_dinov2", 0, ("dinov2_hub", "timm")),
    "dinov2_reg4_s": Release("vit_small_patch14_reg4_dinov2", 0, ("dinov2_hub", "timm")),
    "dinov2_l": Release("vit_large_patch14_dinov2", 0, ("dinov2_hub", "timm")),
    "dinov2_reg4_l": Release("vit_large_patch14_reg4_dinov2", 0, ("dinov2_hub", "timm")),
    # OpenAI trained CLIP with QuickGELU; timm's plain *_clip_224 ids use GELU.
    "clip_b32": Release("vit_base_patch32_clip_quickgelu_224", 512, ("openai_clip", "openai_clip_jit", "timm")),
    "clip_l": Release("vit_large_patch14_clip_quickgelu_224", 768, ("openai_clip", "openai_clip_jit", "timm")),
    "siglip_b": Release("vit_base_patch16_siglip_224", 0, ("big_vision", "timm")),
    "siglip_l": Release("vit_large_patch16_siglip_256", 0, ("big_vision", "timm")),
    "vit_ti_in1k": Release("vit_tiny_patch16_224", 1000, ("augreg", "timm")),
    "vit_l_in1k": Release("vit_large_patch16_224", 1000, ("augreg", "timm")),
}


def release_model(name: str, *, seed: int = 0, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised model of release ``name``'s architecture at its native resolution, in eval mode.
    ``timm_kwargs`` change it (e.g. ``depth=2``: the same blocks, fewer of them, for fast tests)."""
    release = RELEASES[name]
    torch.manual_seed(seed)
    return timm.create_model(release.arch, pretrained=False, num_classes=release.num_classes, **timm_kwargs).eval()


def write_release(model: nn.Module, name: str, layout: str, path: str | os.PathLike, *,
                  dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` (from ``release_model(name)``) as release ``name`` in ``layout``.

    ViT-L files in fp16 (loaders cast to the model's dtype): about 610 MB each (SigLIP-L 640 MB, with its MAP
    head), written in about 10 s on 2 CPU cores including the model's initialisation.
    """
    if layout not in RELEASES[name].layouts:
        raise ValueError(f"{name} is not published as {layout}; it comes as {', '.join(RELEASES[name].layouts)}")
    return LAYOUTS[layout](model, path, dtype=dtype)


def fingerprint(state: State) -> dict[str, list[float]]:
    """Per tensor: its shape and a position-weighted sum (a transposed or permuted tensor changes it), to compare a
    loaded model with the model a file was written from without keeping either in memory."""
    prints = {}
    for key, value in state.items():
        flat = value.detach().double().flatten()
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64) if flat.numel() > 1 else torch.ones(1, dtype=torch.float64)
        prints[key] = [*value.shape, float((flat * weights).sum()), float(flat.abs().sum())]
    return prints


def round_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with every parameter and buffer rounded through ``dtype``: what a file stored in it loads back as."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))
    return model


class ReleaseFiles:
    """Full-size release files (``RELEASES``) in fp16, written on first use into ``root`` and kept there between
    test sessions: one copy of each, about 610 MB per ViT-L file, 10-20 s to write one on 2 CPU cores. A stamp of
    this module's source and the timm and torch versions clears the folder when any of them changes.

    Beside the files: ``<name>.source.pt`` with the fingerprint of the model they were written from and, for
    releases whose native resolution is at most 256, its ``forward_features`` on ``probe_input(size)``.
    """

    STAMP = "stamp.txt"
    DTYPE = torch.float16
    PROBE_MAX_SIZE = 256  # a ViT-L forward at 518 px takes ~20 s on 2 cores; the smaller ones ~2 s

    def __init__(self, root: Path) -> None:
        self.root = root
        stamp = f"{code_digest()} timm {timm.__version__} torch {torch.__version__}"
        if not (root / self.STAMP).is_file() or (root / self.STAMP).read_text() != stamp:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            (root / self.STAMP).write_text(stamp)

    def file(self, name: str, layout: str, suffix: str) -> Path:
        """Release ``name`` in ``layout``, saved under a name ending in ``suffix`` (``.pth``, ``.npz`` ...)."""
        path = self.root / f"{name}.{layout}{suffix}"
        if not path.is_file():
            tmp = path.with_name(f".tmp-{path.name}")  # the suffix decides the format: keep it
            write_release(self._model(name), name, layout, tmp, dtype=self.DTYPE)
            os.replace(tmp, path)
        return path

    def source(self, name: str) -> dict:
        """``{"fingerprint": ..., "probe": tensor or None}`` of the model release ``name``'s files hold."""
        path = self.root / f"{name}.source.pt"
        if not path.is_file():
            self._model(name)
        return torch.load(path, weights_only=True)

    def _model(self, name: str) -> nn.Module:
        """The release's model (the same for every call: seeded), rounded to the files' dtype."""
        model = round_to(release_model(name), self.DTYPE)
        path = self.root / f"{name}.source.pt"
        if not path.is_file():
            size = model.patch_embed.img_size[0]
            probe = None
            if size <= self.PROBE_MAX_SIZE:
                with torch.no_grad():
                    probe = model.forward_features(probe_input(size))
            torch.save({"fingerprint": fingerprint(model.state_dict()), "probe": probe}, path)
        return model


def code_digest() -> str:
    """A digest of this module's code without docstrings and comments: what decides the files' content."""
    tree = ast.parse(Path(__file__).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()


def probe_input(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def release_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ReleaseFiles:
    """The full-size release files, kept in pytest's cache folder (``.pytest_cache``) between sessions."""
    cache = request.config.cache
    root = cache.mkdir("adala-releases") if cache is not None else tmp_path_factory.mktemp("releases")
    return ReleaseFiles(Path(root))
