"""The paper's defaults: each stage's data set, Stage-2 epochs from the model with the shards' manifest count, the
pipelines' data per step, scoped overrides combined, one normalised attention choice, and the demo's job graph.

Validation (``adala.run.validate``, ``--check``) on small real shards; nothing here trains a ViT-L."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adala.__main__ import main
from adala.config import compose, override
from adala.data.tario import encode_png, write_samples
from adala.errors import UserError
from adala.launch.pipeline import DEFAULT_MODELS, VARIANTS, plan, validate_jobs
from adala.models import read_export_metadata
from adala.run import run_stage, validate, validate_run

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = {"align_attention": "coco", "align_features": "in22k", "finetune_cls": "in1k", "finetune_seg": "ade20k"}
PAPER_EPOCHS = {"dinov2_l": 30, "clip_l": 15, "siglip_l": 10, "vit_l_in1k": 20}  # Stage 2, paper Table 5
SAMPLES = 40  # in the unlabeled shards' manifest
# Stage-2 steps, ⌈epochs × 40 samples / (16 per rank × ranks)⌉, for 1 and 2 ranks
STAGE2_STEPS = {1: {"dinov2_l": 75, "clip_l": 38, "siglip_l": 25, "vit_l_in1k": 50},
                2: {"dinov2_l": 38, "clip_l": 19, "siglip_l": 13, "vit_l_in1k": 25}}


def images(count: int, *, labelled: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        sample = {"__key__": f"{index:05d}", "png": encode_png(pixels)}
        if labelled:
            sample.update({"cls": str(index % 4).encode(), "seg.png": encode_png((pixels[..., 0] > 127).astype(np.uint8))})
        out.append(sample)
    return out


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 images in 4 shards with their manifest."""
    directory = tmp_path_factory.mktemp("unlabeled")
    write_samples(images(SAMPLES), directory, split="train", per_shard=10)
    return str(directory / "train-{000000..000003}.tar")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(train, val): 64 labelled images in 8 shards, one for each of the 8 readers of the paper data configs."""
    directory = tmp_path_factory.mktemp("labelled")
    write_samples(images(64, labelled=True), directory, split="train", per_shard=8)
    write_samples(images(8, labelled=True), directory, split="val", per_shard=8)
    return str(directory / "train-{000000..000007}.tar"), str(directory / "val-000000.tar")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A weight file; validation only needs it to exist (these tests build no model)."""
    path = tmp_path_factory.mktemp("weights") / "teacher.safetensors"
    save_file({"stand_in": torch.zeros(1)}, str(path))
    return str(path)


def stage2(model: str, weights: str, shards: str, *extra: str) -> list[str]:
    return ["stage=align_features", f"model={model}", override("model.weights", weights), override("data.train", shards),
            *extra]


@pytest.mark.parametrize("stage, data", PAPER_DATA.items())
def test_each_stage_reads_the_papers_data_set_unless_told_otherwise(stage: str, data: str) -> None:
    assert compose([f"stage={stage}"]).data.name == data
    assert compose([f"stage={stage}", "data=demo"]).data.name == "demo"
    assert compose(["data=cityscapes", f"stage={stage}"]).data.name == "cityscapes", "data= wins wherever it stands"


def test_the_demo_alone_keeps_the_demo_data() -> None:
    cfg = compose([])
    assert cfg.stage is None and cfg.data.name == "demo"


@pytest.mark.parametrize("model", PAPER_EPOCHS)
def test_stage2_steps_come_from_the_models_epochs_and_the_manifest(model: str, unlabeled: str, weights: str) -> None:
    cfg = validate(compose(stage2(model, weights, unlabeled)), world_size=2)
    assert cfg.model.align_features_epochs == PAPER_EPOCHS[model] and cfg.stage.epochs == PAPER_EPOCHS[model]
    assert cfg.data.name == "in22k" and cfg.data.train_samples == 14197122, "the config's count, which the manifest beats"
    assert cfg.train.max_steps == STAGE2_STEPS[2][model]


def test_stage2_epochs_and_steps_given_by_the_user_win(unlabeled: str, weights: str) -> None:
    assert validate(compose(stage2("dinov2_l", weights, unlabeled, "stage.epochs=2")), world_size=1).train.max_steps == 5
    assert validate(compose(stage2("dinov2_l", weights, unlabeled, "train.max_steps=7")), world_size=1).train.max_steps == 7


def test_without_a_manifest_the_configs_sample_count_is_used(tmp_path: Path, weights: str) -> None:
    write_samples(images(10), tmp_path, split="train", per_shard=10)
    (tmp_path / "train.manifest.json").unlink()
    shards = str(tmp_path / "train-000000.tar")
    cfg = validate(compose(stage2("clip_l", weights, shards, "data.train_samples=64")), world_size=1)
    assert cfg.train.max_steps == 60  # 15 epochs x 64 / 16
    with pytest.raises(UserError, match="set train.max_steps, or stage.epochs and data.train_samples"):
        validate(compose(stage2("clip_l", weights, shards, "data=demo")), world_size=1)


def test_the_readme_stage2_command_checks_for_a_real_model(unlabeled: str, weights: str, capsys) -> None:
    """``--check`` of the README's Stage-2 command: no train.max_steps, no data.train_samples."""
    code = main(["--check", "stage=align_features", "model=dinov2_l", f"model.weights={weights}", "model.img_size=518",
                 f'data.train="{unlabeled}"', "run_dir=runs/dinov2_l-s2"])
    out = capsys.readouterr().out
    assert code == 0 and "model dinov2_l" in out and "75 steps" in out, out  # 30 x 40 / 16


def pipeline_overrides(weights: str, unlabeled: str, labelled: tuple[str, str]) -> list[str]:
    return [*(f"{model}:model.weights={weights}" for model in DEFAULT_MODELS),
            f's1:data.train="{unlabeled}"', f's2:data.train="{unlabeled}"',
            f'in1k:data.train="{labelled[0]}"', f'in1k:data.val="{labelled[1]}"']


def test_pipeline_stage1_reads_coco_and_every_real_model_validates(
    tmp_path: Path, weights: str, unlabeled: str, labelled: tuple[str, str]
) -> None:
    jobs = plan(DEFAULT_MODELS, tmp_path, tasks=["in1k"], overrides=pipeline_overrides(weights, unlabeled, labelled))
    configs = {job.name: cfg for job, cfg in zip(jobs, validate_jobs(jobs, world_size=1))}
    for model in DEFAULT_MODELS:
        s1, s2, cls = configs[f"{model}/s1"], configs[f"{model}/s2"], configs[f"{model}/in1k"]
        assert (s1.data.name, s2.data.name, cls.data.name) == ("coco", "in22k", "in1k")
        assert s1.train.max_steps == 5  # 4 epochs x 40 / 32
        assert s2.train.max_steps == STAGE2_STEPS[1][model]
        assert cls.train.max_steps == 80  # 10 epochs x 64 / 8
        assert s2.stage.init == str(tmp_path / model / "s1_align_attention" / "export" / "model.safetensors")


def test_launchers_validate_every_real_model(tmp_path: Path, weights: str, unlabeled: str,
                                             labelled: tuple[str, str]) -> None:
    """``launchers/submit.py --dry-run`` and the Ray sweep's planning, for the default (paper) models."""
    from adala.launch.ray_sweep import parse, plan_sweep

    overrides = pipeline_overrides(weights, unlabeled, labelled)
    out = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "--dry-run", "--gpus-per-node", "1",
                          "--cpus-per-task", "1", "--mem-gb", "1", "--tasks", "in1k", "--root", str(tmp_path / "submit"), *overrides],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(f"{model}/s2" in out.stdout for model in DEFAULT_MODELS)
    args, rest = parse(["--workers", "1", "--tasks", "in1k", "--root", str(tmp_path / "sweep"), *overrides])
    assert len(plan_sweep(args, rest)) == 3 * len(DEFAULT_MODELS)


def test_scoped_overrides_combine_model_and_step(tmp_path: Path) -> None:
    overrides = ["dinov2_l:s2:train.seed=4", "train.seed=1", "s2:train.seed=2", "dinov2_l:train.seed=3",
                 "dinov2_l:in1k:train.log_every=7", "s3:train.log_every=5"]
    jobs = plan(["dinov2_l", "clip_l"], tmp_path, tasks=["in1k", "ade20k"], overrides=overrides)
    seeds = {job.name: compose(job.overrides).train.seed for job in jobs}
    assert seeds == {"dinov2_l/s1": 3, "dinov2_l/s2": 4, "dinov2_l/in1k": 3, "dinov2_l/ade20k": 3,
                     "clip_l/s1": 1, "clip_l/s2": 2, "clip_l/in1k": 1, "clip_l/ade20k": 1}
    log_every = {job.name: compose(job.overrides).train.log_every for job in jobs if job.task}
    assert log_every == {"dinov2_l/in1k": 7, "dinov2_l/ade20k": 5, "clip_l/in1k": 5, "clip_l/ade20k": 5}
    for bad, message in (("dinov2_l:clip_l:train.seed=1", "combine at most one model and one step"),
                         ("s1:s2:train.seed=1", "combine at most one model and one step"),
                         ("dinov2_l:s4:train.seed=1", "unknown scope 's4'")):
        with pytest.raises(UserError, match=message):
            plan(["dinov2_l", "clip_l"], tmp_path, overrides=[bad])


@pytest.mark.parametrize("stage", ["align_attention", "align_features"])
def test_softmax_attention_contradicts_the_alignment_stages(stage: str, unlabeled: str, weights: str, capsys) -> None:
    code = main(["--check", f"stage={stage}", "attention=softmax", f"model.weights={weights}",
                 f'data.train="{unlabeled}"', "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"stage {stage} trains linear attention, so attention=softmax contradicts it" in err


def test_attention_is_normalised_once_for_the_stage(labelled: tuple[str, str], weights: str) -> None:
    data = [override("data.train", labelled[0]), override("data.val", labelled[1]), "data.workers=1", "train.max_steps=1"]
    softmax = validate_run(compose(["stage=finetune_cls", "attention=softmax", *data]), world_size=1)
    assert softmax.attention == {"kind": "softmax"}
    with pytest.raises(UserError, match="attention.kernel is not a setting of the chosen attention"):
        compose(["stage=finetune_cls", "attention=softmax", "attention.kernel=relu", *data])
    linear = validate_run(compose(["stage=align_attention", "attention=relu", "attention.eps=1e-4",
                                   override("model.weights", weights), *data]), world_size=1)
    assert linear.attention == {"kind": "linear", "kernel": "relu", "eps": 1e-4}
    with pytest.raises(UserError, match="attention.eps must be positive"):
        validate(compose(["stage=finetune_cls", "attention.eps=0", *data]), world_size=1)


def test_stage1_trains_the_chosen_kernel(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    result = run_stage(compose([
        "stage=align_attention", "data=demo", override("data.train", demo_shards["pretrain"]), "attention=relu",
        override("model.weights", random_teacher), override("run_dir", tmp_path), "train.max_steps=2",
        "stage.batch_size=4", "train.progress=false",
    ]))
    assert read_export_metadata(result.export)["attention"]["kernel"] == "relu"


def test_the_demo_graph_holds_the_ablation_in_order(tmp_path: Path, random_teacher: str) -> None:
    sizes = ["demo.pretrain_samples=64", "demo.finetune_samples=64", "demo.val_samples=32",
             override("demo.cache_dir", tmp_path / "cache")]
    jobs = plan(["demo_tiny"], tmp_path / "demo", overrides=sizes, demo=True, ablation=True, teacher=random_teacher)
    names = [job.step for job in jobs]
    assert names == ["s1", "s2", "s2_without_s1", *(task if variant == "adala" else f"{variant}_{task}"
                                                    for variant in VARIANTS for task in ("cls", "seg"))]
    for index, job in enumerate(jobs):
        assert all(jobs.index(before) < index for before in job.after), f"{job.name} runs after what it needs"
    configs = {job.step: compose(job.overrides) for job in jobs}
    assert all(cfg.data.name == "demo" for cfg in configs.values())
    exports = {job.step: str(job.export) for job in jobs}
    starts = {step: (cfg.stage.init, cfg.model.weights, cfg.attention["kind"]) for step, cfg in configs.items()}
    assert starts["s2"] == (exports["s1"], random_teacher, "linear")
    assert starts["s2_without_s1"] == (None, random_teacher, "linear")
    assert starts["teacher_cls"] == (None, random_teacher, "softmax")
    assert starts["seg"] == (exports["s2"], random_teacher, "linear")
    assert starts["s2_s3_cls"] == (exports["s2_without_s1"], random_teacher, "linear")
    assert starts["s1_s3_seg"] == (exports["s1"], random_teacher, "linear")
    assert starts["s3_only_cls"] == (None, random_teacher, "linear")
    assert starts["scratch_linear_seg"] == (None, None, "linear")
    pipeline = plan(["demo_tiny"], tmp_path / "p", overrides=sizes, demo=True)
    assert [job.step for job in pipeline] == ["teacher", "s1", "s2", "cls", "seg"], "the pipelines' demo: no ablation"

