"""``python -m adala compare``: every plug through its paper protocol and AdaLA's stages, as jobs of the pipeline's
graph, and the Table-1-shaped report with the per-block error figure."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adala.__main__ import main as cli
from adala.eval.attention_table import COLUMNS
from adala.launch.comparison import plan_comparison

TINY = ["demo.pretrain_samples=128", "demo.finetune_samples=64", "demo.val_samples=32", "demo.samples_per_shard=64",
        "demo.teacher_steps=3", "demo.teacher_batch_size=16", "demo.align_attention_steps=2",
        "demo.align_features_steps=2", "demo.finetune_steps=2", "demo.align_batch_size=8",
        "demo.finetune_batch_size=8"]


def test_protocols_are_jobs_of_the_pipeline_graph(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.safetensors"
    jobs = plan_comparison("demo_tiny", ["performer", "lolcats"], tmp_path / "runs",
                           overrides=[*TINY, f"demo.cache_dir={tmp_path / 'cache'}"], demo=True, teacher=teacher)
    assert list(jobs) == ["softmax", "performer", "lolcats"]
    assert [(job.stage, job.variant) for job in jobs["softmax"]] == [("finetune_cls", "teacher"),
                                                                     ("finetune_seg", "teacher")]
    steps = {attention: {job.step: job for job in planned} for attention, planned in jobs.items()}
    # AdaLA: Stage 1 → 2 → 3 with the plug; the plain baseline fine-tunes the linearized teacher
    assert steps["performer"]["cls"].after == [steps["performer"]["s2"]]
    assert steps["performer"]["baseline_cls"].after == []
    assert not any(o.startswith("stage.init=") for o in steps["performer"]["baseline_cls"].overrides)
    assert "attention=performer" in steps["performer"]["baseline_seg"].overrides
    # LoLCATS: its own Stage 1 first, then its recipe's LoRA, which validation resolves (no override here); AdaLA's
    # Stages 2 and 3 train in full
    assert steps["lolcats"]["baseline_cls"].after == [steps["lolcats"]["s1"]]
    for step in ("baseline_cls", "baseline_seg"):
        assert not any(o.startswith("stage.lora") for o in steps["lolcats"][step].overrides)
    for step in ("s2", "cls", "seg"):
        assert [o for o in steps["lolcats"][step].overrides if o.startswith("stage.lora")] == ["stage.lora=0"]
    assert not any(o.startswith("stage.lora") for job in jobs["performer"] for o in job.overrides)
    run_dirs = [job.run_dir for planned in jobs.values() for job in planned]
    assert len(set(run_dirs)) == len(run_dirs)


@pytest.mark.parametrize("args, message", [
    (["--attentions", "nope"], "nope"),
    (["--attentions", "softmax"], "reference row"),
    (["model=demo_small"], "demo.key=value overrides and model.img_size=N"),
])
def test_bad_input_is_refused_before_any_work(args: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["compare", *args, f"demo.run_dir={tmp_path / 'run'}", f"demo.cache_dir={tmp_path / 'cache'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_compare_writes_the_table_and_the_per_block_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert cli(["compare", "--attentions", "elu1,hedgehog", *TINY, f"demo.run_dir={run_dir}",
                f"demo.cache_dir={tmp_path / 'cache'}", "model.img_size=48"]) == 0
    # every job at 48² (145 tokens), the demo's teacher (trained at 32²) resampled
    for job in ("softmax/demo_tiny/s3_teacher_cls", "hedgehog/demo_tiny/s1_align_attention", "elu1/demo_tiny/s3_seg"):
        assert "img_size: 48" in (run_dir / job / "config.yaml").read_text(), job
    summary = json.loads((run_dir / "compare.json").read_text())
    rows = [(row["attention"], row["variant"]) for row in summary["rows"]]
    assert rows == [("softmax", "teacher"), ("elu1", "adala"), ("elu1", "baseline"), ("hedgehog", "adala"),
                    ("hedgehog", "baseline")]
    for row in summary["rows"]:
        assert 0 <= row["top1"] <= 1 and 0 <= row["miou"] <= 1
        assert row["params"] > 0 and row["gflops"] > 0 and row["images_per_s"] > 0
    by_attention = {row["attention"]: row for row in summary["rows"]}
    assert by_attention["hedgehog"]["params"] > by_attention["elu1"]["params"]  # its feature maps are parameters
    assert "attention_scores" in by_attention["hedgehog"]["protocol"]
    table = (run_dir / "compare.md").read_text().splitlines()
    assert table[0] == "| attention | protocol | " + " | ".join(COLUMNS) + " |"
    assert len(table) == 2 + len(rows)
    figure = json.loads((run_dir / "per_block_error.json").read_text())
    assert (run_dir / "per_block_error.png").stat().st_size > 0
    assert set(figure["block_errors"]) == {"elu1 AdaLA S1+S2", "elu1 linearized", "hedgehog AdaLA S1+S2",
                                           "hedgehog own Stage 1"}
    for errors in figure["block_errors"].values():
        assert len(errors) == 4 and all(0 < e < float("inf") for e in errors)  # demo_tiny: 4 blocks
    assert figure["block_errors"] == summary["block_errors"]
