"""Weight files in each release's original layout load into the model they were written from: the small models of
every family at once, the README's full-size releases (with the registry's architecture) in the slow tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adala.models import build_vfm, load_weights
from tests.weight_layouts import (
    RELEASES, ReleaseFiles, fingerprint, probe_input, release_files, release_model, write_dinov2_hub, write_openai_clip,
    write_release,
)  # release_files: a fixture

SUFFIX = {"timm": ".safetensors", "dinov2_hub": ".pth", "openai_clip": ".pt", "openai_clip_jit": ".pt",
          "big_vision": ".npz", "augreg": ".npz"}
SMALL = ("dinov2_s", "dinov2_reg4_s", "clip_b32", "siglip_b", "vit_ti_in1k")


DEPTH = 2  # every block is converted alike: two of them show the per-block (and stacked) layout, fast


def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features and the pooled/head output (CLIP's projection, SigLIP's MAP head, the IN-1K classifier)."""
    size = model.patch_embed.img_size[0]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.forward_features(x)
        return features, model.forward_head(features)


@pytest.mark.parametrize("name, layout", [(n, layout) for n in SMALL for layout in RELEASES[n].layouts])
def test_a_file_in_the_original_layout_loads_back_into_the_model(name: str, layout: str, tmp_path: Path) -> None:
    source = release_model(name, seed=1, depth=DEPTH)
    path = write_release(source, name, layout, tmp_path / f"{name}{SUFFIX[layout]}")
    fresh = release_model(name, seed=2, depth=DEPTH)
    load_weights(fresh, path)
    for got, want in zip(outputs(fresh), outputs(source)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", RELEASES["dinov2_s"].layouts)
def test_build_vfm_reads_dinov2_files(layout: str, tmp_path: Path) -> None:
    source = release_model("dinov2_s", seed=1)
    path = write_release(source, "dinov2_s", layout, tmp_path / f"dinov2_s{SUFFIX[layout]}")
    model = build_vfm("dinov2_s", weights=path)
    want = source.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-7, rtol=1e-6, msg=key)


def test_a_writer_refuses_a_model_of_another_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="OpenAI CLIP layout needs norm_pre.weight"):
        write_openai_clip(release_model("dinov2_s", depth=1), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="DINOv2 hub layout has no place for norm_pre"):
        write_dinov2_hub(release_model("clip_b32", depth=1), tmp_path / "x.pth")


# The files the README's commands name (tests/test_docs.py uses the same ones).
FULL_SIZE = [("dinov2_l", "dinov2_hub", ".pth"), ("dinov2_l", "timm", ".safetensors"), ("clip_l", "openai_clip", ".bin"),
             ("clip_l", "timm", ".safetensors"), ("siglip_l", "big_vision", ".npz"), ("vit_l_in1k", "timm", ".pth")]


@pytest.mark.slow
@pytest.mark.parametrize("name, layout, suffix", FULL_SIZE)
def test_a_full_size_release_loads_into_the_registry_model(name: str, layout: str, suffix: str,
                                                           release_files: ReleaseFiles) -> None:
    """The registry's model ``name`` is the release's architecture: every tensor of the file lands where the
    release had it, and (where the native resolution is small enough to run) it computes the release's features."""
    path = release_files.file(name, layout, suffix)
    source = release_files.source(name)
    model = build_vfm(name, weights=path).eval()
    got = fingerprint(model.state_dict())
    missing = sorted(set(got) - set(source["fingerprint"]))
    assert not missing, f"the registry's {name} has tensors the release has not: {missing[:5]}"
    for key, value in got.items():
        assert value[:-2] == source["fingerprint"][key][:-2], f"{key}: shape {value[:-2]}"
        assert value[-2:] == pytest.approx(source["fingerprint"][key][-2:], rel=1e-6, abs=1e-6), key
    if source["probe"] is not None:
        with torch.no_grad():
            features = model.forward_features(probe_input(model.patch_embed.img_size[0]))
        torch.testing.assert_close(features, source["probe"], atol=1e-4, rtol=1e-4,
                                   msg=f"the registry's {name} computes other features than the release")
