"""Models are configuration: the YAML entries, ``model=timm`` for any timm VisionTransformer, a user's own entry,
and the resolution policy (images padded to whole patches) at the paper's 512² and 1024².

Large models are built on the meta device: shapes and token counts without weights or compute.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from adala.__main__ import main
from adala.config import compose
from adala.errors import UserError
from adala.models import (
    build_vfm, create_kwargs, get_vfm, list_vfms, model_spec, read_export_metadata, token_layout,
)
from adala.stages.finetune_seg import Segmenter

REPO = Path(__file__).resolve().parent.parent
BUILT_IN = [name for name in list_vfms() if name != "timm"]
DEMO = ("demo_tiny", "demo_small")
MAE = "vit_base_patch16_224.mae"
DEIT = "deit_tiny_patch16_224.fb_in1k"

# The paper's models (Table 5): the timm architecture, the Stage-2 loss weight α and Stage-2 epochs.
PAPER = {
    "dinov2_l": ("vit_large_patch14_dinov2", 5.0, 30),
    "clip_l": ("vit_large_patch14_clip_quickgelu_224", 4000.0, 15),
    "siglip_l": ("vit_large_patch16_siglip_256", 1.0, 10),
    "vit_l_in1k": ("vit_large_patch16_224", 1.0, 20),
}


def meta_timm(timm_id: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(timm_id, pretrained=False, **kwargs)


# ------------------------------------------------------------------------------------------- the YAML entries


@pytest.mark.parametrize("name", PAPER)
def test_paper_models_carry_the_paper_settings(name: str) -> None:
    spec = get_vfm(name)
    assert (spec.timm_id.split(".")[0], spec.alpha, spec.align_features_epochs) == PAPER[name]


@pytest.mark.parametrize("name", [n for n in BUILT_IN if n not in DEMO])
def test_entries_agree_with_timm(name: str) -> None:
    """Patch size, native resolution and normalisation in each entry are those of the timm model and its weights."""
    spec = get_vfm(name)
    vit = meta_timm(spec.timm_id, **spec.timm_kwargs)
    assert spec.patch_size == vit.patch_embed.patch_size[0]
    assert spec.native_img_size == vit.patch_embed.img_size[0]
    assert spec.mean == pytest.approx(vit.pretrained_cfg["mean"], abs=1e-8)
    assert spec.std == pytest.approx(vit.pretrained_cfg["std"], abs=1e-8)


@pytest.mark.parametrize("name", DEMO)
def test_demo_entries_are_small_vits(name: str) -> None:
    spec = get_vfm(name)
    vit = build_vfm(name)
    assert spec.patch_size == vit.patch_embed.patch_size[0] == 4
    assert token_layout(vit, spec.native_img_size) == {"img_size": 32, "grid": [8, 8], "tokens": 65}
    assert (vit.embed_dim, len(vit.blocks)) == (spec.timm_kwargs["embed_dim"], spec.timm_kwargs["depth"])


def test_composed_overrides_are_the_spec(tmp_path: Path) -> None:
    """Stage runs build from the composed cfg.model: the user's overrides are what the spec says."""
    cfg = compose(["stage=align_features", "model=dinov2_s", "model.alpha=7", "model.timm_id=vit_small_patch14_reg4_dinov2"])
    spec = model_spec(cfg.model)
    assert (spec.name, spec.alpha, spec.timm_id) == ("dinov2_s", 7.0, "vit_small_patch14_reg4_dinov2")
    assert build_vfm(spec, img_size=28).num_prefix_tokens == 5  # the class token and 4 registers


# ------------------------------------------------------------------------------------------------- model=timm


def test_model_timm_fills_its_fields_from_timm() -> None:
    cfg = compose(["stage=align_features", "model=timm", f"model.timm_id={MAE}", "model.alpha=3"])
    spec = model_spec(cfg.model)
    vit = meta_timm(MAE)
    assert (spec.name, spec.timm_id, spec.alpha) == ("timm", MAE, 3.0)
    assert (spec.patch_size, spec.native_img_size) == (16, 224)
    assert (spec.mean, spec.std) == (vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"])


def test_model_timm_trains_and_exports(tmp_path: Path, demo_shards: dict[str, str]) -> None:
    """A DeiT through a real Stage-3 run at a resolution that is not a multiple of its patch: the export records
    the model, so it rebuilds from its metadata alone, and its token layout."""
    from adala.run import run_stage

    run_dir = tmp_path / "run"
    cfg = compose(["stage=finetune_cls", "model=timm", f"model.timm_id={DEIT}", "model.img_size=40", "data=demo",
                   f'data.train="{demo_shards["finetune"]}"', "train.max_steps=2", "stage.batch_size=4",
                   f"run_dir={run_dir}"])
    result = run_stage(cfg)

    meta = read_export_metadata(result.export)
    assert meta["model"] == "timm" and meta["model_spec"]["timm_id"] == DEIT
    assert (meta["img_size"], meta["grid"], meta["tokens"]) == (40, [3, 3], 3 * 3 + 1)  # 40 px padded to 48
    rebuilt = build_vfm(model_spec(meta["model_spec"]), img_size=40, weights=result.export,
                        num_classes=meta["num_classes"])
    assert type(rebuilt.blocks[0].attn).__name__ == "LinearAttention"
    assert rebuilt(torch.randn(1, 3, 40, 40)).shape == (1, meta["num_classes"])


def test_stage2_alpha_comes_from_the_model(tmp_path: Path, demo_shards: dict[str, str]) -> None:
    from adala.run import validate_run
    from adala.stages import get_stage

    weights = tmp_path / "teacher.pth"
    torch.save(build_vfm(model_spec(compose(["model=timm", f"model.timm_id={DEIT}"]).model), img_size=32).state_dict(),
               weights)
    base = ["stage=align_features", "model=timm", f"model.timm_id={DEIT}", "model.img_size=32", "model.alpha=2.5",
            f"model.weights={weights}", "data=demo", f'data.train="{demo_shards["pretrain"]}"', "train.max_steps=1",
            f"run_dir={tmp_path / 'run'}"]
    for extra, alpha in (([], 2.5), (["stage.alpha=0.5"], 0.5)):
        run = validate_run(compose([*base, *extra]))
        assert get_stage("align_features").build(run.cfg, run.attention).model.alpha == alpha


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({}, ["model.timm_id is not set", f"model=timm model.timm_id={MAE}"]),
        ({"timm_id": "vit_bse_patch16_224"}, ["unknown timm model 'vit_bse_patch16_224'", "vit_base_patch16_224"]),
        ({"timm_id": "resnet50"}, ["resnet50 is a timm ResNet, not a VisionTransformer", MAE]),
        ({"timm_id": "eva02_tiny_patch14_224.mim_in22k"}, ["timm Eva, not a VisionTransformer"]),
        ({"timm_id": "vit_base_patch16_224.nope"}, ["Invalid pretrained tag (nope)"]),
        ({"timm_id": DEIT, "timm_kwargs": {"depht": 2}}, ["model.timm_kwargs", "depht"]),
        ({"timm_id": DEIT, "mean": [0.5, 0.5]}, ["model.mean must be 3 numbers"]),
    ],
)
def test_bad_model_fields_are_one_line(fields: dict, fragments: list[str]) -> None:
    entry = {"name": "timm", "alpha": 1.0, "align_features_epochs": 20, **fields}
    with pytest.raises(UserError) as info:
        model_spec(entry)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_a_users_own_entry(tmp_path: Path, demo_shards: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A YAML file in the model folder of a config directory (ADALA_CONFIG_DIR) is a model like the built-ins."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    text = (conf / "model" / "timm.yaml").read_text()
    (conf / "model" / "deit_t.yaml").write_text(
        text.replace("name: timm", "name: deit_t").replace("timm_id: null", f"timm_id: {DEIT}")
        .replace("alpha: 1.0", "alpha: 2.0"))
    monkeypatch.setenv("ADALA_CONFIG_DIR", str(conf))
    assert "deit_t" in list_vfms() and get_vfm("deit_t").alpha == 2.0

    out = subprocess.run(
        [sys.executable, "-m", "adala", "--check", "stage=finetune_cls", "model=deit_t", "data=demo",
         f'data.train="{demo_shards["finetune"]}"', "train.max_steps=1", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "ADALA_CONFIG_DIR": str(conf)}, capture_output=True, text=True)
    assert out.returncode == 0 and "model deit_t" in out.stdout, out.stderr


# ------------------------------------------------------------------------------------------------ resolutions


@pytest.mark.parametrize(("img_size", "grid"), [(512, 37), (1024, 74), (518, 37)])
def test_paper_resolutions_of_a_patch14_model(img_size: int, grid: int, caplog: pytest.LogCaptureFixture) -> None:
    """DINOv2 ViT-L/14 at 512² and 1024²: padded to 37² and 74² patches, 1370 and 5477 tokens (class token
    included); the token count is logged when the model is built."""
    caplog.set_level(logging.INFO, logger="adala.models")
    with torch.device("meta"):
        vit = build_vfm("dinov2_l", img_size=img_size, attention={"kind": "linear"})
        tokens = vit.forward_features(torch.zeros(2, 3, img_size, img_size))
    expected = grid * grid + 1
    assert token_layout(vit, img_size) == {"img_size": img_size, "grid": [grid, grid], "tokens": expected}
    assert tokens.shape == (2, expected, 1024)
    assert f"{grid}×{grid} patches of 14 px" in caplog.text and f"{expected} tokens" in caplog.text


def test_paper_resolution_passes_validation(tmp_path: Path, demo_shards: dict[str, str], capsys) -> None:
    assert main(["--check", "stage=finetune_cls", "model=dinov2_l", "model.img_size=512", "data=demo",
                 f'data.train="{demo_shards["finetune"]}"', "train.max_steps=1", f"run_dir={tmp_path / 'run'}"]) == 0
    assert "model dinov2_l" in capsys.readouterr().out


def shallow_dinov2_s():
    """dinov2_s with 2 blocks: the same patch embedding and tokens, built in a fraction of the time."""
    return dataclasses.replace(get_vfm("dinov2_s"), timm_kwargs={"depth": 2})


def test_padding_is_zeros_to_whole_patches() -> None:
    """dinov2_s at 50² is the 56² model (same weights) on images zero-padded at the bottom and right."""
    spec = shallow_dinov2_s()
    assert create_kwargs(spec, 50) == {"depth": 2, "img_size": 56, "num_classes": 0, "dynamic_img_pad": True,
                                       "dynamic_img_size": True}
    assert create_kwargs(spec, 56) == {"depth": 2, "img_size": 56, "num_classes": 0}
    padded, whole = build_vfm(spec, img_size=50).eval(), build_vfm(spec, img_size=56).eval()
    whole.load_state_dict(padded.state_dict())
    x = torch.randn(2, 3, 50, 50)
    with torch.no_grad():
        torch.testing.assert_close(padded.forward_features(x), whole.forward_features(F.pad(x, (0, 6, 0, 6))))


def test_segmentation_grid_of_a_padded_resolution() -> None:
    """The segmentation head's logits cover the image, not its padding: those of the padded image, cropped."""
    spec = shallow_dinov2_s()
    padded, whole = (Segmenter(build_vfm(spec, img_size=size), num_classes=3).eval() for size in (50, 56))
    whole.load_state_dict(padded.state_dict())
    x = torch.randn(2, 3, 50, 50)
    mask = torch.zeros(2, 50, 50, dtype=torch.long)
    with torch.no_grad():
        logits = padded({"image": x, "mask": mask}).prediction
        reference = whole({"image": F.pad(x, (0, 6, 0, 6)), "mask": F.pad(mask, (0, 6, 0, 6))}).prediction
    assert logits.shape == (2, 3, 50, 50)
    torch.testing.assert_close(logits, reference[..., :50, :50])
