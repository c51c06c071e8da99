"""LoRA in segmentation fine-tuning (adapters on the backbone, the head in full, merged exports) and a plug's LoRA
recipe (LoLCATS: rank 8, α 16 after attention transfer) resolved by validation unless ``stage.lora`` is set."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from adala.config import compose, override
from adala.errors import UserError
from adala.models import build_vfm
from adala.models.weights import read_state_dict
from adala.run import run_stage, validate, validate_run
from adala.stages import finetune_seg
from adala.stages.common import strip_prefix
from adala.stages.seg_heads import build_head

RECIPE_LINE = "LoRA switched on by the recipe of attention=lolcats"
TINY_LOLCATS = ("attention=lolcats", "attention.feature_dim=16", "attention.window=16")  # fits demo_tiny's 8 × 8 grid


def overrides(run_dir: Path, shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return ["data=demo", override("data.train", shards["finetune"]), "stage.batch_size=4", "train.max_steps=1",
            "train.progress=false", "train.log_every=1", override("model.weights", teacher),
            override("run_dir", run_dir), *extra]


def head_options(head: str) -> tuple[str, ...]:
    if head == "linear":
        return ("stage.head=linear",)
    pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    from test_segmentation import TINY_HEAD

    return TINY_HEAD


@pytest.mark.parametrize("head", ["linear", "mask2former"])
def test_segmentation_with_lora_trains_adapters_and_head_and_exports_the_merged_model(
        head: str, tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    run = validate_run(compose(overrides(tmp_path, demo_shards, random_teacher, "stage=finetune_seg", "stage.lora=4",
                                         *head_options(head))))
    parts = finetune_seg.build(run.cfg, run.attention)
    model = parts.model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for group in parts.param_groups(model) for p in group["params"] if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    images = torch.randn(2, 3, 32, 32)
    mask = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0).long()  # classes readable from the pixels
    losses = []
    for _ in range(6):
        out = model({"image": images, "mask": mask})
        optimizer.zero_grad()
        out.loss.backward()
        graded = {name for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(out.loss.item())
    head_params = {name for name, _ in model.named_parameters() if name.startswith("seg_head.")}
    adapters = graded - head_params
    assert head_params <= graded and adapters
    assert all(n.startswith("backbone.blocks.") and n.endswith((".qkv.lora_a", ".qkv.lora_b", ".proj.lora_a",
                                                                ".proj.lora_b")) for n in adapters), adapters
    assert losses[-1] < losses[0], losses

    path = parts.export(model.state_dict(), tmp_path / "model.safetensors", step=6)
    state = read_state_dict(path)
    assert not any("lora" in key for key in state)
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], start["backbone.blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(state["blocks.0.mlp.fc1.weight"], start["backbone.blocks.0.mlp.fc1.weight"])
    backbone = build_vfm("demo_tiny", weights=path)  # a plain model, no adapters
    loaded_head = build_head(run.cfg.stage.head, embed_dim=backbone.embed_dim, depth=len(backbone.blocks),
                             num_classes=run.cfg.data.num_seg_classes, options=run.cfg.stage.mask2former)
    loaded_head.load_state_dict(strip_prefix(state, "seg_head."))
    loaded = finetune_seg.Segmenter(backbone, run.cfg.data.num_seg_classes, loaded_head).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(images), model.eval().predict(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage, extra, lora, alpha, switched_on", [
    ("align_features", TINY_LOLCATS, 8, 16.0, True),
    ("finetune_cls", TINY_LOLCATS, 8, 16.0, True),
    ("finetune_seg", TINY_LOLCATS, 8, 16.0, True),
    ("align_attention", TINY_LOLCATS, 0, 16.0, False),  # attention transfer itself trains the plug's maps
    ("finetune_cls", (*TINY_LOLCATS, "stage.lora=0"), 0, 16.0, False),
    ("finetune_seg", (*TINY_LOLCATS, "stage.lora=4", "stage.lora_alpha=8"), 4, 8.0, False),
    ("align_features", (*TINY_LOLCATS, "stage.trainable=qkv"), 0, 16.0, False),  # the user chose what trains
    ("finetune_cls", ("attention=elu1",), 0, 16.0, False),
    ("finetune_seg", ("attention=elu1", "stage.lora=4"), 4, 16.0, False),
])
def test_validation_resolves_lora_from_the_plugs_recipe(
        stage: str, extra: tuple[str, ...], lora: int, alpha: float, switched_on: bool, tmp_path: Path,
        demo_shards: dict[str, str], random_teacher: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="adala.run"):
        cfg = validate(compose(overrides(tmp_path, demo_shards, random_teacher, f"stage={stage}", *extra)))
    assert (cfg.stage.lora, cfg.stage.lora_alpha) == (lora, alpha)
    assert [r.getMessage() for r in caplog.records if RECIPE_LINE in r.getMessage()] == (
        [f"stage.lora=8, stage.lora_alpha=16: {RECIPE_LINE} (stage.lora=0 trains in full)"] if switched_on else [])


def test_lora_outside_the_stages_that_take_it_is_refused(tmp_path: Path, demo_shards: dict[str, str],
                                                         random_teacher: str) -> None:
    with pytest.raises(UserError, match="applies to stages align_features, finetune_cls, finetune_seg"):
        validate(compose(overrides(tmp_path, demo_shards, random_teacher, "stage=align_attention", "stage.lora=8")))


def test_the_recipes_segmentation_run_resumes_exactly(tmp_path: Path, demo_shards: dict[str, str],
                                                      random_teacher: str) -> None:
    common = overrides(tmp_path, demo_shards, random_teacher, "stage=finetune_seg", *TINY_LOLCATS,
                       "stage.optim.schedule=constant", "train.save_every=2", "train.max_steps=4")
    full = run_stage(compose([*common, override("run_dir", tmp_path / "full")]))
    recorded = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["stage"]
    assert (recorded["lora"], recorded["lora_alpha"]) == (8, 16.0)
    resumed = run_stage(compose([*common, override("run_dir", tmp_path / "resumed"),
                                 override("resume", tmp_path / "full" / "checkpoints" / "step-2")]))
    expected, actual = read_state_dict(full.export), read_state_dict(resumed.export)
    assert expected.keys() == actual.keys() and not any("lora" in key for key in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    teacher = read_state_dict(random_teacher)
    assert not torch.equal(expected["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(expected["blocks.0.mlp.fc1.weight"], teacher["blocks.0.mlp.fc1.weight"])  # frozen
