"""The three stages chained through their exports, and the built-in demo in a reduced size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adala.attention import LinearAttention
from adala.config import compose, override
from adala.demo import VARIANTS, format_table, run_demo
from adala.errors import UserError
from adala.models import build_vfm, read_export_metadata
from adala.run import run_stage


def overrides(run_dir: Path, *extra: str) -> list[str]:
    """A stage run on the demo's shards (``data=demo``: every stage defaults to the paper's data set)."""
    return [override("run_dir", run_dir), "data=demo", "train.log_every=1", "train.progress=false", *extra]


def test_stage1_lowers_every_block_loss(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    result = run_stage(compose(overrides(
        tmp_path, "stage=align_attention", override("model.weights", random_teacher), override("data.train", demo_shards['pretrain']),
        "train.max_steps=40", "stage.batch_size=16",
    )))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    blocks = sorted(k for k in records[0] if k.startswith("loss/block"))
    assert len(blocks) == 4
    for block in blocks:
        first = sum(r[block] for r in records[:3]) / 3
        last = sum(r[block] for r in records[-3:]) / 3
        assert last < 0.5 * first, f"{block}: {first:.3g} -> {last:.3g}"
    # Only Q/K/V train: the exported student keeps the teacher's output projections and MLPs exactly.
    teacher = build_vfm("demo_tiny", weights=random_teacher)
    student = build_vfm("demo_tiny", weights=result.export)
    assert isinstance(student.blocks[0].attn, LinearAttention)
    trained = student.state_dict()
    for name, expected in teacher.state_dict().items():
        actual = trained[name]
        if ".attn.qkv." in name:
            assert not torch.equal(expected, actual), name
        else:
            assert torch.equal(expected, actual), name


def test_stages_chain_through_exports(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    common = (override("model.weights", random_teacher), "train.max_steps=3", "stage.batch_size=8")
    s1 = run_stage(compose(overrides(tmp_path / "s1", "stage=align_attention", *common,
                                     override("data.train", demo_shards['pretrain']))))
    s2 = run_stage(compose(overrides(tmp_path / "s2", "stage=align_features", *common,
                                     override("data.train", demo_shards['pretrain']), override("stage.init", s1.export))))
    labelled = (override("data.train", demo_shards['finetune']), override("data.val", demo_shards['val']), override("stage.init", s2.export))
    cls = run_stage(compose(overrides(tmp_path / "cls", "stage=finetune_cls", *common, *labelled)))
    seg = run_stage(compose(overrides(tmp_path / "seg", "stage=finetune_seg", *common, *labelled)))
    assert 0.0 <= cls.metrics["top1"] <= 1.0 and 0.0 <= seg.metrics["miou"] <= 1.0
    for result, stage in ((s1, "align_attention"), (s2, "align_features"), (cls, "finetune_cls"), (seg, "finetune_seg")):
        meta = read_export_metadata(result.export)
        assert meta["stage"] == stage and meta["attention"]["kind"] == "linear"
        assert (result.run_dir / "config.yaml").is_file()
        assert any((result.run_dir / "tb").iterdir())
    assert read_export_metadata(cls.export)["num_classes"] == 12
    classifier = build_vfm("demo_tiny", weights=cls.export, num_classes=12)
    assert isinstance(classifier.blocks[-1].attn, LinearAttention)


@pytest.mark.slow
def test_reduced_demo_writes_report(tmp_path: Path) -> None:
    sizes = [
        "demo.pretrain_samples=512", "demo.finetune_samples=256", "demo.val_samples=128", "demo.teacher_steps=10",
        "demo.align_attention_steps=5", "demo.align_features_steps=5", "demo.finetune_steps=5",
        override("demo.cache_dir", tmp_path / "cache"), override("demo.run_dir", tmp_path / 'demo'), "train.progress=false",
    ]
    both = [*sizes, "demo.seg=both", "demo.mask2former_steps=3"]  # both heads' segmentation for every variant
    summary = run_demo(compose(both), both)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report == summary
    assert list(report["variants"]) == list(VARIANTS)
    jobs = tmp_path / "demo" / "demo_tiny"  # the stage runs are the jobs of the pipelines' graph
    assert all((jobs / run / "export" / "model.safetensors").is_file()
               for run in ("s1_align_attention", "s2_align_features", "s2_without_s1", "s3_cls", "s3_scratch_linear_seg",
                           "s3_mask2former", "s3_teacher_mask2former"))
    assert read_export_metadata(jobs / "s3_s1_s3_mask2former" / "export" / "model.safetensors")["seg_head"] == "mask2former"
    last_step = {run: json.loads((jobs / run / "log.jsonl").read_text().splitlines()[-1])["step"]
                 for run in ("s3_seg", "s3_mask2former")}
    assert last_step == {"s3_seg": 5, "s3_mask2former": 3}
    for row in report["variants"].values():
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["miou"] <= 1.0 and 0.0 <= row["miou_mask2former"] <= 1.0
    assert "M2F mIoU" in format_table(report["variants"])
    # The figures of every run, linked from the report: Stage 2 with and without Stage 1 overlaid (paper Fig. 7).
    assert report["figures"] == "report/index.html" and (tmp_path / "demo" / "report" / "index.html").is_file()
    loss = json.loads((tmp_path / "demo" / "report" / "loss.json").read_text())
    assert set(loss["runs"]["align_features"]) == {"s2_align_features", "s2_without_s1"}
    assert (tmp_path / "demo" / "report" / "pca.png").is_file()
    teachers = list((tmp_path / "cache").glob("demo-*/teacher-*.safetensors"))
    assert len(teachers) == 1
    # The second run reuses the cached shards and teacher; the default demo has the linear head only.
    stamp = teachers[0].stat().st_mtime_ns
    again = run_demo(compose(sizes), sizes)
    assert teachers[0].stat().st_mtime_ns == stamp
    assert all("miou_mask2former" not in row for row in again["variants"].values())
    assert "M2F mIoU" not in format_table(again["variants"])


def test_unknown_demo_segmentation_head_is_one_line_before_any_work(tmp_path: Path) -> None:
    sizes = ["demo.seg=upernet", override("demo.cache_dir", tmp_path / "cache"), override("demo.run_dir", tmp_path / "demo")]
    with pytest.raises(UserError, match="unknown demo.seg 'upernet'; use one of linear, mask2former, both"):
        run_demo(compose(sizes), sizes)
    assert not (tmp_path / "cache").exists()


def test_demo_data_config_matches_the_generator() -> None:
    from adala.data.demo_images import NUM_CLASSES, NUM_SEG_CLASSES

    cfg = compose(["data=demo"])
    assert (cfg.data.num_classes, cfg.data.num_seg_classes) == (NUM_CLASSES, NUM_SEG_CLASSES)


def test_demo_labels_need_global_context() -> None:
    """The class is the (left, right) pair of shape types; each object's pixels are labelled by (own type, the
    other's type), so the same shape takes a different label next to a different partner."""
    import numpy as np

    from adala.data.demo_images import NUM_SEG_CLASSES, SHAPES, class_of, render

    pairs = {class_of(a, b): (a, b) for a in range(len(SHAPES)) for b in range(len(SHAPES)) if a != b}
    rng = np.random.default_rng(0)
    labels, mask_values = set(), set()
    for _ in range(400):
        _, mask, label = render(rng)
        left, right = pairs[label]
        labels.add(label)
        values = set(np.unique(mask).tolist())
        assert values == {0, 1 + class_of(left, right), 1 + class_of(right, left)}
        assert (mask[:, :8] != 1 + class_of(right, left)).all()  # the left object's label sits on the left
        mask_values |= values
    assert labels == set(range(len(SHAPES) * (len(SHAPES) - 1)))
    assert mask_values == set(range(NUM_SEG_CLASSES))
    assert len({1 + class_of(0, other) for other in range(1, len(SHAPES))}) == len(SHAPES) - 1
