"""Tests for adala.models: build_vfm, weight loading, linearize and exports (model entries and resolutions:
``test_model_configs.py``).

Every model is built with random weights (there is no network to the model hubs) at a small resolution.
Files in foreign layouts (original DINOv2, OpenAI CLIP) are produced by inverting timm's converters.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import adala.models.weights as weights_module
from adala.attention import KERNELS, LinearAttention
from adala.errors import UserError
from adala.models import (
    VFMSpec, attention_config, build_vfm, get_vfm, linearize, list_vfms, load_weights, read_export_metadata,
    save_export,
)

SMALL_MODELS = ("demo_tiny", "dinov2_s")
BUILT_IN = [name for name in list_vfms() if name != "timm"]  # model=timm is a template: it needs model.timm_id
PATCHES = 4  # images are PATCHES × PATCHES patches unless a test says otherwise
LINEAR_EXPORT = {"kind": "linear", "kernel": "relu", "eps": 1e-4}  # not the defaults, so they must be carried


# ---------------------------------------------------------------------------------------------------- helpers


def spec_of(model: str | VFMSpec) -> VFMSpec:
    return get_vfm(model) if isinstance(model, str) else model


def size_for(model: str | VFMSpec, patches: int = PATCHES) -> int:
    return patches * spec_of(model).patch_size


def is_large(name: str) -> bool:
    return "large" in get_vfm(name).timm_id


def with_slow_marks(names: Iterable[str]) -> list[Any]:
    return [pytest.param(name, marks=pytest.mark.slow) if is_large(name) else name for name in names]


def images(name: str, patches: int = PATCHES, batch: int = 2) -> Tensor:
    size = size_for(name, patches)
    return torch.randn(batch, 3, size, size)


@torch.no_grad()
def features(model: nn.Module, x: Tensor) -> Tensor:
    return model.eval().forward_features(x)


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def attn_weights(model: nn.Module) -> dict[str, Tensor]:
    """qkv and proj parameters of every block's token mixer."""
    return {
        f"blocks.{i}.attn.{k}": v.detach().clone()
        for i, block in enumerate(model.blocks)
        for k, v in block.attn.state_dict().items()
        if k.startswith(("qkv.", "proj."))
    }


def perturb_(model: nn.Module) -> nn.Module:
    """Move every parameter away from what a freshly seeded build would give, so a load that silently does
    nothing cannot pass an equality test."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_model(name: str | VFMSpec, patches: int = PATCHES, **kwargs: Any) -> nn.Module:
    return perturb_(build_vfm(name, img_size=size_for(name, patches), **kwargs))


@functools.cache
def _cached_state(name: str) -> dict[str, Tensor]:
    torch.manual_seed(1234)
    return state_of(random_model(name))


def reference_state(name: str) -> dict[str, Tensor]:
    """Random timm-layout weights of ``name`` at PATCHES × PATCHES patches (built once per session)."""
    return dict(_cached_state(name))


def assert_tensors_equal(
    actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, skip: Iterable[str] = ()
) -> None:
    skip = set(skip)
    assert sorted(set(actual) - skip) == sorted(set(expected) - skip)
    differing = [k for k in expected if k not in skip and not torch.equal(actual[k], expected[k])]
    assert not differing, f"{len(differing)} tensors differ: {differing[:5]}"


def assert_user_error(call: Callable[[], Any], *fragments: str) -> str:
    """``call`` raises UserError whose message contains every fragment; returns the message."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def is_linear(model: nn.Module) -> bool:
    return all(isinstance(block.attn, LinearAttention) for block in model.blocks)


# Writers for the checkpoint formats build_vfm accepts: suffix and how the state dict is stored.
def _write_safetensors(state: Mapping[str, Tensor], path: Path) -> None:
    save_file(dict(state), str(path))


def _write_pth(state: Mapping[str, Tensor], path: Path) -> None:
    torch.save(dict(state), path)


def _write_pth_wrapped(state: Mapping[str, Tensor], path: Path) -> None:
    torch.save({"model": dict(state), "epoch": 3}, path)


def _write_pth_state_dict(state: Mapping[str, Tensor], path: Path) -> None:
    torch.save({"state_dict": dict(state)}, path)


WRITERS: dict[str, tuple[str, Callable[[Mapping[str, Tensor], Path], None]]] = {
    "safetensors": (".safetensors", _write_safetensors),
    "pth": (".pth", _write_pth),
    "pth_model": (".pth", _write_pth_wrapped),
    "pth_state_dict": (".pth", _write_pth_state_dict),
}


def write(fmt: str, state: Mapping[str, Tensor], directory: Path, stem: str = "weights") -> Path:
    suffix, writer = WRITERS[fmt]
    path = directory / f"{stem}{suffix}"
    writer(state, path)
    return path


def build_loaded(name: str | VFMSpec, path: Path, patches: int = PATCHES, **kwargs: Any) -> nn.Module:
    return build_vfm(name, img_size=size_for(name, patches), weights=path, **kwargs)


# ---------------------------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", with_slow_marks(BUILT_IN))
def test_every_model_builds_and_linearizes(name: str) -> None:
    model = build_vfm(name, img_size=size_for(name))
    assert attention_config(model) == {"kind": "softmax"}
    x = images(name, batch=1)
    teacher = features(model, x)
    before = attn_weights(model)

    assert linearize(model) is model

    assert len(model.blocks) > 0 and is_linear(model)
    config = attention_config(model)
    assert config["kind"] == "linear" and config["kernel"] == "elu1"
    assert_tensors_equal(attn_weights(model), before)
    student = features(model, x)
    assert student.shape == teacher.shape
    assert torch.isfinite(student).all()
    assert not torch.equal(student, teacher), "linearize did not change the token mixer"


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_build_with_linear_attention_request(name: str) -> None:
    model = build_vfm(name, img_size=size_for(name), attention={"kind": "linear", "kernel": "relu", "eps": 1e-3})
    assert is_linear(model)
    assert attention_config(model) == {"kind": "linear", "kernel": "relu", "eps": 1e-3}


# ------------------------------------------------------------------------------------------------------ names


def test_unknown_model_lists_valid_names() -> None:
    assert_user_error(lambda: build_vfm("dinov3_giant"), "dinov3_giant", *list_vfms())


@pytest.mark.parametrize(
    "attention, fragments",
    [
        ({"kind": "linear", "kernel": "nope"}, ("nope", *KERNELS)),
        ({"kind": "sparse"}, ("sparse", "softmax", "linear")),
    ],
)
def test_unknown_attention_is_a_user_error(attention: dict[str, Any], fragments: tuple[str, ...]) -> None:
    assert_user_error(lambda: build_vfm("demo_tiny", attention=attention), *fragments)


# ---------------------------------------------------------------------------------------- weight round trips


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_weights_round_trip(name: str, fmt: str, tmp_path: Path) -> None:
    state = reference_state(name)
    model = build_loaded(name, write(fmt, state, tmp_path))
    assert attention_config(model) == {"kind": "softmax"}
    assert_tensors_equal(state_of(model), state)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_softmax_weights_linearized_on_request(name: str, tmp_path: Path) -> None:
    state = reference_state(name)
    model = build_loaded(name, write("safetensors", state, tmp_path), attention=LINEAR_EXPORT)
    assert is_linear(model) and attention_config(model) == LINEAR_EXPORT
    loaded = state_of(model)
    records = {k for k in loaded if k.endswith(".attn.linear_config")}  # what only linear attention has
    assert len(records) == len(model.blocks)
    assert_tensors_equal(loaded, state, skip=records)


def _prefix_tokens(pos_embed: Tensor, patches: int = PATCHES) -> int:
    return pos_embed.shape[1] - patches * patches


@pytest.mark.parametrize("name", [*SMALL_MODELS, "dinov2_reg4_s"])
def test_other_resolution_resamples_pos_embed(name: str, tmp_path: Path) -> None:
    state = reference_state(name)
    pos = state["pos_embed"]
    prefix = _prefix_tokens(pos)
    # A grid that is constant per channel stays constant under any interpolation, so the resampled values are
    # known without re-implementing timm's resampling.
    grid_value = torch.randn(pos.shape[-1])
    state["pos_embed"] = torch.cat([pos[:, :prefix], grid_value.expand(1, PATCHES * PATCHES, -1)], dim=1)
    new_patches = PATCHES + 2

    model = build_loaded(name, write("safetensors", state, tmp_path), patches=new_patches)

    loaded = model.pos_embed.detach()
    assert loaded.shape == (1, prefix + new_patches * new_patches, pos.shape[-1])
    assert torch.equal(loaded[:, :prefix], pos[:, :prefix])
    torch.testing.assert_close(loaded[:, prefix:], grid_value.expand_as(loaded[:, prefix:]))
    assert_tensors_equal(state_of(model), state, skip={"pos_embed"})


# ------------------------------------------------------------------------------------ foreign file layouts

_DINOV2_KEY = re.compile(
    r"(cls_token|pos_embed|mask_token|register_tokens|(patch_embed\.proj|norm)\.(weight|bias)"
    r"|blocks\.\d+\.((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|ls[12]\.gamma))"
)


def to_original_dinov2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of timm's ``_convert_dinov2`` for the facebookresearch/dinov2 ViT-S/B/L hub checkpoints.

    The original keeps ``mask_token`` (timm drops it), stores registers as ``register_tokens`` and, for register
    models, gives the class token a position embedding that timm folds into ``cls_token``.
    """
    out = dict(state)
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = torch.randn(1, dim)
    if "reg_token" in out:
        cls_pos = torch.randn(1, 1, dim)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
    unknown = [k for k in out if not _DINOV2_KEY.fullmatch(k)]
    assert not unknown, f"not in the original DINOv2 layout: {unknown}"
    return out


@pytest.mark.parametrize("name", ["dinov2_s", "dinov2_reg4_s"])
def test_original_dinov2_layout(name: str, tmp_path: Path) -> None:
    state = reference_state(name)
    original = to_original_dinov2(state)
    assert ("register_tokens" in original) == ("reg_token" in state)

    model = build_loaded(name, write("pth", original, tmp_path))

    loaded = state_of(model)
    assert_tensors_equal(loaded, state, skip={"cls_token"})
    # cls_token - p + p is exact only up to rounding
    torch.testing.assert_close(loaded["cls_token"], state["cls_token"], rtol=0, atol=1e-6)


_OPENAI_CLIP_SWAPS = [  # timm name -> OpenAI name, the inverse of timm's _convert_openai_clip
    (r"patch_embed\.proj\.weight", "conv1.weight"),
    (r"norm_pre\.(weight|bias)", r"ln_pre.\1"),
    (r"norm\.(weight|bias)", r"ln_post.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"transformer.resblocks.\1.ln_\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
]


def _openai_clip_name(key: str) -> str:
    for pattern, replacement in _OPENAI_CLIP_SWAPS:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise AssertionError(f"{key} has no OpenAI CLIP counterpart")


def to_openai_clip(state: Mapping[str, Tensor], embed_dim: int = 8) -> dict[str, Tensor]:
    """A timm CLIP image tower (no head) in the layout of OpenAI's released CLIP checkpoints: ``visual.`` image
    tower with ``class_embedding``/``positional_embedding`` without batch dims, the projection ``visual.proj``
    and text-tower keys that a loader must ignore."""
    out = {
        "visual.class_embedding": state["cls_token"].reshape(-1),
        "visual.positional_embedding": state["pos_embed"][0],
        "visual.proj": torch.randn(state["cls_token"].shape[-1], embed_dim),
        "positional_embedding": torch.randn(7, embed_dim),
        "token_embedding.weight": torch.randn(11, embed_dim),
        "logit_scale": torch.tensor(4.6),
    }
    for key, value in state.items():
        if key not in ("cls_token", "pos_embed"):
            out[f"visual.{_openai_clip_name(key)}"] = value
    return out


@pytest.fixture
def shallow_clip() -> VFMSpec:
    """clip_l with 2 blocks instead of 24: the same architecture (pre-norm, QuickGELU, no patch bias), built in
    a fraction of the time."""
    spec = get_vfm("clip_l")
    return dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "depth": 2})


def test_openai_clip_layout(shallow_clip: VFMSpec, tmp_path: Path) -> None:
    state = state_of(random_model(shallow_clip))
    assert "norm_pre.weight" in state and "patch_embed.proj.bias" not in state  # really CLIP's architecture

    model = build_loaded(shallow_clip, write("pth", to_openai_clip(state), tmp_path))

    assert_tensors_equal(state_of(model), state)


# ----------------------------------------------------------------------------------------------- bad weights


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "weights.safetensors"
    assert_user_error(lambda: build_vfm("demo_tiny", weights=path), str(path))
    assert_user_error(lambda: load_weights(build_vfm("demo_tiny"), path), str(path))


@pytest.mark.parametrize(
    "source, target", [("dinov2_s", "demo_tiny"), ("demo_tiny", "dinov2_s"), ("dinov2_s", "dinov2_reg4_s")]
)
def test_weights_of_another_model(source: str, target: str, tmp_path: Path) -> None:
    path = write("safetensors", reference_state(source), tmp_path)
    message = assert_user_error(lambda: build_loaded(target, path), str(path), target, "model=")
    assert re.search(r"missing|unexpected|wrong shape", message), message


def _random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())


def _truncated_checkpoint(path: Path) -> None:
    fmt = "safetensors" if path.suffix == ".safetensors" else "pth"
    write(fmt, reference_state("demo_tiny"), path.parent, stem=path.stem)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("corrupt", [_random_bytes, _truncated_checkpoint], ids=["random", "truncated"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_weights_file(suffix: str, corrupt: Callable[[Path], None], tmp_path: Path) -> None:
    path = tmp_path / f"weights{suffix}"
    corrupt(path)
    assert_user_error(lambda: build_vfm("demo_tiny", weights=path), str(path))


# ---------------------------------------------------------------------------------------------------- exports


def export(model: nn.Module, path: Path, name: str = "demo_tiny", **extra: Any) -> Path:
    metadata = {"model": name, "attention": attention_config(model), "stage": 2, **extra}
    return save_export(model.state_dict(), path, metadata=metadata)


@pytest.fixture
def linear_export(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A linearized demo_tiny (non-default kernel and eps) and its export."""
    model = linearize(random_model("demo_tiny", patches=8), kernel=LINEAR_EXPORT["kernel"], eps=LINEAR_EXPORT["eps"])
    return model, export(model, tmp_path / "exports" / "demo_tiny_linear.safetensors")


def test_export_round_trip(linear_export: tuple[nn.Module, Path]) -> None:
    model, path = linear_export
    x = images("demo_tiny", patches=8)
    for attention in (None, LINEAR_EXPORT):
        loaded = build_vfm("demo_tiny", weights=path, attention=attention)
        assert is_linear(loaded)
        assert attention_config(loaded) == attention_config(model) == LINEAR_EXPORT
        assert_tensors_equal(state_of(loaded), state_of(model))
        assert torch.equal(features(loaded, x), features(model, x))


SHALLOW_DINOV2 = dataclasses.replace(get_vfm("dinov2_s"), timm_kwargs={"depth": 2})  # dinov2_s, 2 blocks: fast


def plain_timm_args(path: Path) -> dict[str, Any]:
    """The README's plain-timm call for (2-block) dinov2_s, without the attention layer; weights from ``path``."""
    return dict(model_name="vit_small_patch14_dinov2", depth=2, pretrained=True,
                pretrained_cfg_overlay=dict(file=str(path)))


@pytest.fixture
def dinov2_export(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A linearized dinov2_s (non-default kernel and eps) at 4 × 4 patches and its export."""
    model = linearize(random_model(SHALLOW_DINOV2), kernel=LINEAR_EXPORT["kernel"], eps=LINEAR_EXPORT["eps"])
    return model, export(model, tmp_path / "model.safetensors", name="dinov2_s")


def test_export_loads_with_plain_timm_in_one_line(dinov2_export: tuple[nn.Module, Path]) -> None:
    """What the README promises: timm alone builds the linear model from an export, kernel and eps included."""
    model, path = dinov2_export
    plain = timm.create_model(**plain_timm_args(path), img_size=size_for("dinov2_s"), attn_layer="adala_linear")
    assert is_linear(plain) and attention_config(plain) == LINEAR_EXPORT
    x = images("dinov2_s")
    assert torch.equal(features(plain, x), features(model, x))


def test_padded_export_loads_with_plain_timm(tmp_path: Path) -> None:
    """A resolution that is not a multiple of the patch: the README's extra arguments rebuild the same model."""
    model = linearize(build_vfm(SHALLOW_DINOV2, img_size=50))  # 4 × 4 patches of 14 px over 56², 50² of them image
    path = export(model, tmp_path / "model.safetensors", name="dinov2_s")
    plain = timm.create_model(**plain_timm_args(path), img_size=56, dynamic_img_pad=True, dynamic_img_size=True,
                              attn_layer="adala_linear")
    x = torch.randn(2, 3, 50, 50)
    assert torch.equal(features(plain, x), features(model, x))


def test_softmax_model_refuses_a_linear_export(dinov2_export: tuple[nn.Module, Path]) -> None:
    """Plain timm with softmax attention, through its pretrained loader and through load_state_dict: both fail on
    the linear-attention entries instead of loading weights that would compute something else."""
    _, path = dinov2_export
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*blocks\.0\.attn\.linear_config"):
        timm.create_model(**plain_timm_args(path), img_size=size_for("dinov2_s"))
    softmax = timm.create_model("vit_small_patch14_dinov2", depth=2, img_size=size_for("dinov2_s"))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*blocks\.0\.attn\.linear_config"):
        softmax.load_state_dict(load_file(str(path)))


def test_linear_weights_without_metadata_load_as_linear(dinov2_export: tuple[nn.Module, Path], tmp_path: Path) -> None:
    """A plain state-dict file of a linear model: its linear-attention entries, not metadata, say what it holds."""
    model, _ = dinov2_export
    path = write("pth", state_of(model), tmp_path)
    loaded = build_loaded(SHALLOW_DINOV2, path)
    assert attention_config(loaded) == LINEAR_EXPORT
    assert_tensors_equal(state_of(loaded), state_of(model))
    assert_user_error(lambda: build_loaded(SHALLOW_DINOV2, path, attention={"kind": "softmax"}), str(path), "relu")


def test_export_written_before_the_kernel_record_loads(tmp_path: Path) -> None:
    """Exports from before LinearAttention stored its kernel: the metadata name the attention, the model keeps it."""
    model = linearize(random_model("demo_tiny"), kernel=LINEAR_EXPORT["kernel"], eps=LINEAR_EXPORT["eps"])
    state = {k: v for k, v in state_of(model).items() if not k.endswith(".attn.linear_config")}
    assert len(state) < len(model.state_dict())
    path = export(model, tmp_path / "old.safetensors")
    save_export(state, path, read_export_metadata(path))
    loaded = build_loaded("demo_tiny", path)
    assert attention_config(loaded) == LINEAR_EXPORT
    x = images("demo_tiny")
    assert torch.equal(features(loaded, x), features(model, x))


@pytest.mark.parametrize(
    "attention",
    [{"kind": "softmax"}, {"kind": "linear", "kernel": "elu1"}, {**LINEAR_EXPORT, "eps": 1e-6}],
    ids=["softmax", "other_kernel", "other_eps"],
)
def test_export_refuses_other_attention(linear_export: tuple[nn.Module, Path], attention: dict[str, Any]) -> None:
    _, path = linear_export
    assert_user_error(lambda: build_vfm("demo_tiny", weights=path, attention=attention), str(path), "relu")


def test_export_into_another_model(linear_export: tuple[nn.Module, Path]) -> None:
    _, path = linear_export
    assert_user_error(lambda: build_loaded("dinov2_s", path), str(path), "demo_tiny", "model=")


def test_export_without_attention_metadata_is_softmax(tmp_path: Path) -> None:
    model = random_model("demo_tiny")
    path = save_export(model.state_dict(), tmp_path / "old.safetensors", metadata={"model": "demo_tiny"})
    loaded = build_loaded("demo_tiny", path)
    assert attention_config(loaded) == {"kind": "softmax"}
    assert_tensors_equal(state_of(loaded), state_of(model))


def test_save_export_leaves_no_temp_file(tmp_path: Path) -> None:
    model = random_model("demo_tiny")
    path = tmp_path / "model.safetensors"
    for _ in range(2):  # a fresh file, then an overwrite
        export(model, path)
        assert list(tmp_path.iterdir()) == [path]
    assert_tensors_equal(load_file(str(path)), state_of(model))


def test_failed_save_export_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export(random_model("demo_tiny"), tmp_path / "model.safetensors")
    before = path.read_bytes()

    def partial_write(tensors: Mapping[str, Tensor], filename: str, metadata: Optional[dict[str, str]] = None) -> None:
        Path(filename).write_bytes(b"partial safetensors")
        raise OSError("disk full")

    monkeypatch.setattr(weights_module, "save_file", partial_write)
    with pytest.raises(OSError, match="disk full"):
        export(random_model("demo_tiny"), path)

    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------------------------- Stage-3 task heads


@pytest.mark.parametrize("fmt", ["export", "pth"])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_task_head_in_file_is_dropped_or_reinitialised(fmt: str, num_classes: int, tmp_path: Path) -> None:
    stage3 = random_model("demo_tiny", num_classes=10, attention=LINEAR_EXPORT)
    state = state_of(stage3)
    assert state["head.weight"].shape[0] == 10
    if fmt == "export":
        path = export(stage3, tmp_path / "stage3.safetensors", task="classification", num_classes=10)
    else:
        path = write(fmt, state, tmp_path)

    model = build_loaded("demo_tiny", path, num_classes=num_classes)

    assert model.num_classes == num_classes
    head = {"head.weight", "head.bias"}
    assert_tensors_equal(state_of(model), state, skip=head)
    if num_classes:
        assert model.head.weight.shape == (num_classes, state["head.weight"].shape[1])
    else:
        assert not head & set(model.state_dict())
