"""The attention-plug framework: the registry, the attention spec, linearize with any plug (hybrid models, token
layout), exports that load back with their plug, and every stage run with a plug that has state of its own.

``ScaledSoftmax`` is a plug written for these tests: softmax attention through SDPA with a learnable per-head
temperature (a parameter of its own, trained in Stage 1), a random key offset drawn at conversion (a persistent
buffer, like Performer's projections) and one setting; it records the patch grid it last saw."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ATTN_LAYERS
from torch import nn

from adala.attention import PLUGS, AttentionPlug, LinearAttention, get_plug, register
from adala.attention.registry import TIMM_PREFIX
from adala.config import compose, override
from adala.errors import UserError
from adala.models import attention_config, build_vfm, linearize, load_weights, normalise_attention, read_export_metadata
from adala.models.lora import add_lora, merge_lora
from adala.models.spec import describe, overrides, plug_settings
from adala.models.weights import read_state_dict
from adala.run import run_stage
from adala.stages.align_attention import softmax_weights

NAME = "scaled_softmax_test"


class ScaledSoftmax(AttentionPlug):
    name = NAME
    defaults = {"offset_std": 0.1}
    stage1_trainable = ("qkv", "temperature")

    def build_plug_parameters(self, device: Any = None, dtype: Any = None) -> None:
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1, device=device, dtype=dtype))
        self.register_buffer("key_offset", torch.zeros(self.num_heads, 1, self.head_dim, device=device, dtype=dtype))
        self.seen_grid: tuple[int, int] | None = None

    def reset_plug_parameters(self) -> None:
        with torch.no_grad():
            self.key_offset.normal_(0.0, self.settings["offset_std"])

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.seen_grid = self.patch_grid(q.shape[2])
        return F.scaled_dot_product_attention(q * self.temperature, k + self.key_offset, v)


@pytest.fixture
def plug() -> Iterator[type[AttentionPlug]]:
    """``ScaledSoftmax`` registered for one test (selected by ``attention=softmax attention.kind=<NAME>``)."""
    register(ScaledSoftmax)
    yield ScaledSoftmax
    del PLUGS[NAME], ATTN_LAYERS[TIMM_PREFIX + NAME]


def tiny(img_size: int = 32) -> nn.Module:
    return build_vfm("demo_tiny", img_size=img_size).eval()


def test_linear_is_the_linear_plug() -> None:
    assert get_plug("linear") is LinearAttention and ATTN_LAYERS["adala_linear"] is LinearAttention
    model = linearize(tiny(), kernel="relu")
    keys = model.blocks[0].attn.state_dict().keys()
    assert "linear_config" in keys and "plug_config" not in keys  # linear exports keep their form
    assert attention_config(model) == {"kind": "linear", "kernel": "relu", "eps": 1e-6}
    with pytest.raises(ValueError, match="no setting"):
        LinearAttention.check_settings({"kernels": "relu"})


@pytest.mark.parametrize(
    ("attention", "fragments"),
    [
        ({"kind": "nope"}, ("unknown attention 'nope'", "softmax", "linear")),
        ({"kind": "linear", "kernels": "relu"}, ("'linear' has no setting kernels", "eps, kernel")),
        ({"kind": "linear", "kernel": "cosh"}, ("cosh",)),
        ({"kind": "linear", "eps": 0.0}, ("eps must be positive",)),
        ({"kind": "softmax", "kernel": "elu1"}, ("softmax attention has no settings",)),
        ({"kind": "linear", "softmax_blocks": "3"}, ("softmax_blocks must be a list",)),
    ],
)
def test_bad_attention_is_one_line(attention: dict[str, Any], fragments: tuple[str, ...]) -> None:
    with pytest.raises(UserError) as info:
        normalise_attention(attention)
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)


def test_spec_is_normalised_and_described(plug: type[AttentionPlug]) -> None:
    spec = normalise_attention({"kind": NAME, "softmax_blocks": [3, 1, 3]})
    assert spec == {"kind": NAME, "offset_std": 0.1, "softmax_blocks": [1, 3]}
    assert describe(spec) == f"{NAME} attention (offset_std=0.1), softmax in blocks [1, 3]"
    assert overrides(spec) == [f"attention={NAME}", "attention.offset_std=0.1", "attention.softmax_blocks=[1,3]"]
    assert normalise_attention({"kind": "linear"}) == {"kind": "linear", "kernel": "elu1", "eps": 1e-6}


def test_linearize_keeps_softmax_blocks_and_weights(plug: type[AttentionPlug]) -> None:
    model = tiny()
    softmax = {k: v.clone() for k, v in model.state_dict().items()}
    linearize(model, {"kind": NAME, "softmax_blocks": [0, 2]}, offset_std=0.0)
    assert [type(b.attn).__name__ for b in model.blocks] == ["Attention", "ScaledSoftmax", "Attention", "ScaledSoftmax"]
    assert attention_config(model) == {"kind": NAME, "offset_std": 0.0, "softmax_blocks": [0, 2]}
    images = torch.randn(2, 3, 32, 32)
    # Temperature 1 and no offset: the plug computes softmax attention, so the model computes what it did.
    reference = tiny()
    reference.load_state_dict(softmax)
    torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="blocks 0 to 3"):
        build_vfm("demo_tiny", attention={"kind": NAME, "softmax_blocks": [4]})


def test_plugs_learn_the_token_layout_for_each_input_size(plug: type[AttentionPlug]) -> None:
    model = linearize(build_vfm("demo_tiny", img_size=30).eval(), NAME)  # padded to 32²: an 8 × 8 grid
    attn = model.blocks[1].attn
    assert attn.num_prefix_tokens == model.num_prefix_tokens == 1 and attn.grid == (8, 8)
    model.forward_features(torch.randn(1, 3, 20, 40))  # dynamic size: 5 × 10 patches, not a square
    assert attn.seen_grid == (5, 10)
    clone = copy.deepcopy(model)  # the hook of a copy tells the copy's plugs
    clone.forward_features(torch.randn(1, 3, 12, 16))
    assert clone.blocks[1].attn.seen_grid == (3, 4) and attn.seen_grid == (5, 10)


def test_default_attention_weights_are_the_mixing_matrix() -> None:
    model = linearize(tiny(), kernel="relu")
    attn = model.blocks[0].attn
    q, k, v = attn.qkv_heads(torch.randn(2, 65, 64))
    weights = attn.attention_weights(q, k)
    explicit = F.relu(q) @ F.relu(k).transpose(-2, -1)
    torch.testing.assert_close(weights, explicit / (explicit.sum(-1, keepdim=True) + 1e-6), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights @ v, attn.mix(q, k, v), rtol=1e-4, atol=1e-5)


def test_export_loads_back_with_its_plug_and_settings(plug: type[AttentionPlug], tmp_path: Path) -> None:
    from adala.models import save_export

    model = linearize(tiny(), {"kind": NAME, "offset_std": 0.5, "softmax_blocks": [3]})
    with torch.no_grad():
        model.blocks[0].attn.temperature.fill_(2.0)
    path = save_export(model.state_dict(), tmp_path / "plug.safetensors",
                       {"model": "demo_tiny", "attention": attention_config(model)})
    images = torch.randn(2, 3, 32, 32)
    for attention in (None, attention_config(model)):
        loaded = build_vfm("demo_tiny", weights=path, attention=attention).eval()
        assert attention_config(loaded) == attention_config(model)
        assert torch.equal(loaded.blocks[0].attn.key_offset, model.blocks[0].attn.key_offset)
        torch.testing.assert_close(loaded(images), model(images))
    with pytest.raises(UserError, match=f"set attention={NAME} attention.offset_std=0.5"):
        build_vfm("demo_tiny", weights=path, attention={"kind": "linear"})
    # A plain state dict (no metadata): the plug entries put the plug in, with the stored settings.
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    plain = tiny()
    load_weights(plain, tmp_path / "plain.pth")
    assert attention_config(plain) == attention_config(model)
    # Plain timm with the plug as its attention layer loads the export strictly (a fully converted model).
    full = linearize(tiny(), {"kind": NAME, "offset_std": 0.5})
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                                   embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, attn_layer=TIMM_PREFIX + NAME)
    timm_model.load_state_dict(full.state_dict(), strict=True)
    assert timm_model.blocks[0].attn.settings == {"offset_std": 0.5}
    torch.testing.assert_close(timm_model.eval()(images), full(images))


def test_lora_trains_adapters_and_merges_into_plain_weights() -> None:
    model = linearize(tiny())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=8, alpha=16.0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(("lora_a", "lora_b")) and (".qkv." in n or ".proj." in n) for n in trainable)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.normal_()
    merged = merge_lora(model.state_dict())
    assert merged.keys() == reference.keys()
    plain = linearize(tiny())
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(images), model(images), rtol=1e-4, atol=1e-4)


def stage_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [override("run_dir", run_dir), "data=demo", "train.log_every=1", "train.progress=false",
            "stage.batch_size=4", "attention=softmax", f"attention.kind={NAME}", *extra]


@pytest.mark.parametrize("objective", ["output", "head_outputs", "attention_scores"])
def test_stage1_trains_each_plugs_own_parameters(plug: type[AttentionPlug], objective: str, tmp_path: Path,
                                                   demo_shards: dict[str, str], random_teacher: str) -> None:
    result = run_stage(compose(stage_overrides(
        tmp_path, "stage=align_attention", override("model.weights", random_teacher), f"stage.objective={objective}",
        override("data.train", demo_shards["pretrain"]), "train.max_steps=3", "attention.softmax_blocks=[2]",
    )))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted(k for k in records[0] if k.startswith("loss/block")) == ["loss/block00", "loss/block01", "loss/block03"]
    teacher, student = build_vfm("demo_tiny", weights=random_teacher), build_vfm("demo_tiny", weights=result.export)
    assert attention_config(student) == {"kind": NAME, "offset_std": 0.1, "softmax_blocks": [2]}
    changed = {k for k, v in teacher.state_dict().items() if not torch.equal(v, student.state_dict()[k])}
    assert changed and all(".attn.qkv." in k for k in changed) and not any(k.startswith("blocks.2.") for k in changed)
    assert any(not torch.equal(b.attn.temperature, torch.ones_like(b.attn.temperature))
               for i, b in enumerate(student.blocks) if i != 2)


def test_attention_scores_target_is_the_softmax_matrix() -> None:
    attn = tiny().blocks[0].attn
    x = torch.randn(2, 65, 64)
    q, k, v = attn.qkv(x).reshape(2, 65, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(softmax_weights(attn, x) @ v, F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-4, atol=1e-5)


def chain_and_resume(run_root: Path, attention: list[str], spec: dict[str, Any], demo_shards: dict[str, str],
                     random_teacher: str) -> dict[str, torch.Tensor]:
    """Stage 1 → Stage 2 (LoRA) → classification with ``attention`` overrides, the last also resumed from its
    step-2 checkpoint: every export records ``spec``, the resumed run ends where the uninterrupted one does.
    Returns the final export's state."""
    common = [override("run_dir", run_root), "data=demo", "train.log_every=1", "train.progress=false",
              "stage.batch_size=4", override("model.weights", random_teacher), *attention]
    pretrain = override("data.train", demo_shards["pretrain"])

    def run(name: str, *extra: str):
        return run_stage(compose([*common, override("run_dir", run_root / name), *extra]))

    s1 = run("s1", "stage=align_attention", pretrain, "train.max_steps=2")
    s2 = run("s2", "stage=align_features", pretrain, override("stage.init", s1.export), "train.max_steps=2",
             "stage.lora=8")
    labelled = [override("data.train", demo_shards["finetune"]), override("data.val", demo_shards["val"]),
                override("stage.init", s2.export), "stage.optim.schedule=constant", "train.save_every=2",
                "train.max_steps=4", "stage=finetune_cls"]
    full = run("cls", *labelled)
    resumed = run("resumed", *labelled, override("resume", run_root / "cls" / "checkpoints" / "step-2"))
    for result in (s1, s2, full):
        assert read_export_metadata(result.export)["attention"] == spec
    assert not any("lora" in key for key in read_state_dict(s2.export))
    expected, actual = read_state_dict(full.export), read_state_dict(resumed.export)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    loaded = build_vfm("demo_tiny", weights=full.export, num_classes=10)
    assert attention_config(loaded) == spec
    return expected


def test_stages_chain_and_resume_exactly_with_a_plug(plug: type[AttentionPlug], tmp_path: Path,
                                                    demo_shards: dict[str, str], random_teacher: str) -> None:
    spec = {"kind": NAME, "offset_std": 0.1}
    final = chain_and_resume(tmp_path, ["attention=softmax", f"attention.kind={NAME}"], spec, demo_shards,
                             random_teacher)
    # The plug's random buffer is drawn once, at conversion, and travels through every stage's export.
    assert "blocks.0.attn.key_offset" in final and not torch.equal(final["blocks.0.attn.key_offset"],
                                                                   torch.zeros_like(final["blocks.0.attn.key_offset"]))


# ---------------------------------------------------------------- every registered plug through the framework

TINY_SETTINGS = {  # settings that fit demo_tiny (8 × 8 patches + the class token, head_dim 16)
    "hedgehog": {"feature_dim": 16}, "lolcats": {"feature_dim": 16, "window": 16}, "nystrom": {"landmarks": 8},
    "linformer": {"k": 16},  # its grid left to the model
}


def on_demo_tiny(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` as a converted demo_tiny records it: settings left to the model filled in from its 8 × 8 grid."""
    return {**spec, **get_plug(spec["kind"]).settings_for_model(plug_settings(spec), (8, 8))}


@pytest.mark.parametrize("name", sorted(set(PLUGS) - {NAME}))
def test_every_plug_has_its_settings_as_config_keys(name: str) -> None:
    from adala.config import CONFIG_DIR
    import yaml

    entry = yaml.safe_load((CONFIG_DIR / "attention" / f"{name}.yaml").read_text())
    plug = get_plug(name)
    assert {k: v for k, v in entry.items() if k != "kind"} == plug.defaults and entry["kind"] == name
    assert set(plug.defaults).isdisjoint({"kind", "softmax_blocks"})
    cfg = compose([f"attention={name}"])
    assert normalise_attention(cfg.attention)["kind"] == name


@pytest.mark.parametrize("name", sorted(set(PLUGS) - {NAME}))
def test_every_plug_converts_aligns_and_exports(name: str, tmp_path: Path) -> None:
    from adala.models import save_export
    from adala.stages.align_attention import AttentionBranches, BlockProbe

    spec = normalise_attention({"kind": name, **TINY_SETTINGS.get(name, {})})
    teacher = tiny()
    objective = get_plug(name).stage1_objective
    branches = AttentionBranches(teacher, spec, objective)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        targets = BlockProbe(teacher, objective, list(range(4)))(images)
    output = branches({"image": images, "target": targets})
    output.loss.backward()
    trainable = [(n, p) for n, p in branches.named_parameters() if p.requires_grad]
    assert trainable and torch.isfinite(output.loss)
    assert all(n.split(".", 2)[2].startswith(get_plug(name).stage1_trainable) for n, _ in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    model = linearize(tiny(), spec).eval()
    path = save_export(model.state_dict(), tmp_path / "m.safetensors", {"model": "demo_tiny", "attention": spec})
    loaded = build_vfm("demo_tiny", weights=path).eval()
    assert attention_config(loaded) == on_demo_tiny(spec)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_pipeline_jobs_take_the_plug_but_the_softmax_teacher_keeps_softmax(tmp_path: Path) -> None:
    from adala.launch.pipeline import plan

    jobs = plan(["demo_tiny"], tmp_path, tasks=["in1k"], ablation=True,
                overrides=["attention=hedgehog", "attention.feature_dim=16", "attention.softmax_blocks=[3]",
                           "model.weights=teacher.safetensors"])
    kinds = {job.step: compose(job.overrides).attention for job in jobs}
    assert kinds.pop("teacher_in1k")["kind"] == "softmax"
    assert kinds and all(a == {"kind": "hedgehog", "feature_dim": 16, "softmax_blocks": [3]} for a in kinds.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(PLUGS) - {NAME}))
def test_every_plug_runs_the_stages_and_resumes_exactly(name: str, tmp_path: Path, demo_shards: dict[str, str],
                                                        random_teacher: str) -> None:
    spec = normalise_attention({"kind": name, **TINY_SETTINGS.get(name, {})})
    settings = [o for o in overrides(spec) if not o.startswith("attention=")]
    chain_and_resume(tmp_path, [f"attention={name}", *settings], on_demo_tiny(spec), demo_shards, random_teacher)
