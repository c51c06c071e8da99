"""Directly adapting a task model (paper §4.3.3, ``stage.task_model=true``): Stages 1-2 with a fine-tuned softmax
segmenter or classifier as the teacher; the student keeps its head, the task metric is evaluated while aligning,
the export is a complete linear task model, bad input stops before work starts, and a killed run resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adala.config import compose, override
from adala.errors import UserError
from adala.models.weights import read_export_metadata, read_state_dict
from adala.run import run_stage, validate
from adala.stages import align_features

TINY = ["model=demo_tiny", "data=demo", "data.shuffle_buffer=0", "train.progress=false", "train.log_every=1",
        "stage.batch_size=16", "stage.eval_batch_size=32"]


def fine_tune(shards: dict[str, str], weights: str, run_dir: Path, stage: str, *extra: str) -> Path:
    """A softmax task model: ``stage`` (finetune_cls / finetune_seg) for a few steps from ``weights``."""
    return run_stage(compose([f"stage={stage}", *TINY, "attention=softmax", override("model.weights", weights),
                              override("data.train", shards["finetune"]), override("data.val", shards["val"]),
                              "train.max_steps=4", "stage.optim.lr=1e-3", override("run_dir", run_dir), *extra])).export


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory: pytest.TempPathFactory, demo_shards: dict[str, str], random_teacher: str) -> str:
    return str(fine_tune(demo_shards, random_teacher, tmp_path_factory.mktemp("seg_teacher"), "finetune_seg"))


def align(stage: str, shards: dict[str, str], teacher: str, run_dir: Path, *extra: str) -> list[str]:
    """Stage ``stage`` of the task route on the demo's pretraining images, evaluated on its validation split."""
    return [f"stage={stage}", *TINY, "stage.task_model=true", override("model.weights", teacher),
            override("data.train", shards["pretrain"]), override("data.val", shards["val"]), "train.eval_every=2",
            override("run_dir", run_dir), *extra]


def head(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}


def val_metrics(run_dir: Path, name: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row[f"val/{name}"] for row in rows if f"val/{name}" in row}


def test_the_student_starts_with_the_teachers_head(tmp_path: Path, demo_shards: dict[str, str],
                                                    random_teacher: str, seg_teacher: str) -> None:
    """For a classifier and a segmenter, the Stage-2 student's head is the teacher's, frozen; its backbone trains."""
    cls_teacher = fine_tune(demo_shards, random_teacher, tmp_path / "cls", "finetune_cls")
    for teacher, prefix, inner in ((cls_teacher, "head.", "vit.head."), (seg_teacher, "seg_head.", "seg_head.")):
        cfg = validate(compose(align("align_features", demo_shards, str(teacher), tmp_path / "s2", "train.max_steps=1")))
        parts = align_features.build(cfg, {"kind": "linear", "kernel": "elu1", "eps": 1e-6})
        student = {k.removeprefix("student."): v for k, v in parts.model.state_dict().items()}
        expected = head(teacher, prefix)
        assert expected
        for key, value in expected.items():
            torch.testing.assert_close(student[inner + key.removeprefix(prefix)], value, rtol=0, atol=0)
        trains = {name for name, p in parts.model.named_parameters() if p.requires_grad}
        assert trains and not any(name.startswith(f"student.{inner}") for name in trains), "the head is frozen"
        assert any(".blocks.0.attn.qkv." in name for name in trains), "the backbone trains"


def test_stage1_then_stage2_log_miou_and_export_a_task_model_that_evaluates(
        tmp_path: Path, demo_shards: dict[str, str], seg_teacher: str) -> None:
    """Stage 1 → Stage 2 from a softmax segmenter: val/miou logged during both, the teacher's head carried through
    unchanged, and the export evaluated by ``adala.eval.resolution`` gives the run's own final mIoU."""
    from adala.eval import resolution

    s1 = run_stage(compose(align("align_attention", demo_shards, seg_teacher, tmp_path / "s1", "train.max_steps=4")))
    s2 = run_stage(compose(align("align_features", demo_shards, seg_teacher, tmp_path / "s2", "train.max_steps=4",
                                 override("stage.init", s1.export))))
    for result in (s1, s2):
        logged = val_metrics(result.run_dir, "miou")
        assert sorted(logged) == [2, 4] and all(0 < v <= 1 for v in logged.values())
        assert result.metrics["miou"] == pytest.approx(logged[4])
        meta = read_export_metadata(result.export)
        assert (meta["seg_head"], meta["num_seg_classes"], meta["attention"]["kind"]) == ("linear", 13, "linear")
        for key, value in head(seg_teacher, "seg_head.").items():
            torch.testing.assert_close(read_state_dict(result.export)[key], value, rtol=0, atol=0)
    teacher_blocks, student_blocks = read_state_dict(seg_teacher), read_state_dict(s2.export)
    assert not torch.equal(teacher_blocks["blocks.0.attn.qkv.weight"], student_blocks["blocks.0.attn.qkv.weight"])

    args = resolution.parse_args([str(s2.export), "--sizes", "32", "--data", "demo", "--val", demo_shards["val"],
                                  "--teacher", seg_teacher, "--min-time-s", "0", "--out", str(tmp_path)])
    rows = resolution.run(args)["rows"]
    by_role = {row["role"]: row for row in rows}
    assert by_role["export"]["attention"] == "linear" and by_role["teacher"]["attention"] == "softmax"
    assert by_role["export"]["miou"] == pytest.approx(s2.metrics["miou"], abs=1e-6)


def test_a_mask2former_task_model_brings_the_sizes_of_its_head(tmp_path: Path, demo_shards: dict[str, str],
                                                                 random_teacher: str) -> None:
    """A segmenter fine-tuned with a Mask2Former head of other than the default sizes: the task route rebuilds the
    head from the sizes its export recorded (none given here), copies it, and its own export records them again."""
    pytest.importorskip("transformers")
    sizes = ["stage.head=mask2former", "stage.mask2former.hidden_dim=32", "stage.mask2former.num_queries=6",
             "stage.mask2former.decoder_layers=1", "stage.mask2former.encoder_layers=1",
             "stage.mask2former.feedforward=64", "stage.mask2former.train_points=64"]
    teacher = fine_tune(demo_shards, random_teacher, tmp_path / "m2f", "finetune_seg", *sizes, "train.max_steps=1")
    recorded = read_export_metadata(teacher)["mask2former"]
    assert (recorded["hidden_dim"], recorded["num_queries"]) == (32, 6)
    result = run_stage(compose(align("align_features", demo_shards, str(teacher), tmp_path / "s2", "train.max_steps=1")))
    assert head(result.export, "seg_head.").keys() == head(teacher, "seg_head.").keys()
    assert all(torch.equal(value, head(teacher, "seg_head.")[key])
               for key, value in head(result.export, "seg_head.").items())
    meta = read_export_metadata(result.export)
    assert meta["seg_head"] == "mask2former" and meta["mask2former"] == recorded and 0 <= result.metrics["miou"] <= 1


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", [("strategy=fsdp",), ("strategy=deepspeed", "strategy.zero_stage=3")],
                         ids=["fsdp", "zero3"])
def test_the_task_route_runs_on_two_ranks(strategy: tuple[str, ...], tmp_path: Path, demo_shards: dict[str, str],
                                          seg_teacher: str) -> None:
    """Stage 2 of a segmenter on two ranks: the frozen head is the teacher's in the export, and the mIoU is logged
    while aligning and at the end."""
    from test_distributed import run, torchrun

    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    run(torchrun(2, "-m", "adala", *align("align_features", demo_shards, seg_teacher, tmp_path, "train.max_steps=2",
                                          "stage.batch_size=8", *strategy)), timeout=600)
    export = tmp_path / "export" / "model.safetensors"
    assert all(torch.equal(value, head(seg_teacher, "seg_head.")[key])
               for key, value in head(export, "seg_head.").items()) and head(export, "seg_head.")
    assert read_export_metadata(export)["seg_head"] == "linear" and 2 in val_metrics(tmp_path, "miou")
    assert 0 <= json.loads((tmp_path / "metrics.json").read_text())["miou"] <= 1


def test_bad_input_is_one_error_before_work_starts(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str,
                                                    seg_teacher: str) -> None:
    base = align("align_features", demo_shards, seg_teacher, tmp_path / "run", "train.max_steps=1")
    with pytest.raises(UserError, match="needs model.weights to be a task model .* without a task head"):
        validate(compose(align("align_features", demo_shards, random_teacher, tmp_path / "run", "train.max_steps=1")))
    with pytest.raises(UserError, match="data.num_seg_classes=5, but the task model .* has 13 classes"):
        validate(compose([*base, "data.num_seg_classes=5"]))
    with pytest.raises(UserError, match="stage.head=mask2former, but the task model has a linear head"):
        validate(compose([*base, "stage.head=mask2former"]))
    with pytest.raises(UserError, match="stage finetune_seg fine-tunes one already: drop stage.task_model"):
        validate(compose(["stage=finetune_seg", *TINY, "stage.task_model=true", override("model.weights", seg_teacher),
                          override("data.train", demo_shards["finetune"]), "train.max_steps=1"]))
    s1 = tmp_path / "linear.safetensors"  # a linear-attention task model is no softmax teacher
    from adala.models import save_export

    save_export(read_state_dict(seg_teacher), s1, {**read_export_metadata(seg_teacher),
                                                   "attention": {"kind": "linear", "kernel": "elu1", "eps": 1e-6}})
    with pytest.raises(UserError, match="has linear attention; the teacher must be a softmax task model"):
        validate(compose(align("align_attention", demo_shards, str(s1), tmp_path / "run", "train.max_steps=1")))
    assert not (tmp_path / "run").exists(), "nothing was written"


@pytest.mark.slow
def test_resume_after_a_kill_is_exact(tmp_path: Path, demo_shards: dict[str, str], seg_teacher: str) -> None:
    """Stage 2 of the task route killed (SIGKILL) after its step-3 checkpoint and resumed ends with the weights,
    losses and validation mIoU of the run that was never interrupted."""
    from test_distributed import assert_same_weights, losses
    from test_segmentation import kill_after_step_3_then_resume

    killed = tmp_path / "killed"
    argv = align("align_features", demo_shards, seg_teacher, tmp_path / "ref", "train.max_steps=6",
                 "train.save_every=3", "train.eval_every=4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process (OMP_NUM_THREADS=1): the same order of float sums
    try:
        reference = run_stage(compose(argv))
        resumed = kill_after_step_3_then_resume(argv, killed)
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(resumed.export, reference.export, 0)
    assert losses(killed)[-3:] == losses(tmp_path / "ref")[-3:]
    assert val_metrics(killed, "miou") == val_metrics(tmp_path / "ref", "miou")
    assert resumed.metrics == reference.metrics
