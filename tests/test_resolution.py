"""Resolution scaling (adala.eval.resolution) on the demo's tiny ViT and a few demo images, on CPU. Timings are
not asserted, only that they are measured and consistent with the sizes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adala.config import compose
from adala.data.demo_data import ensure_demo_shards
from adala.data.demo_images import NUM_SEG_CLASSES
from adala.eval import resolution
from adala.models import attention_config, build_vfm, save_export
from adala.stages.seg_heads import LinearHead

FAST = ["--min-time-s", "0.01"]


def _seg_export(path: Path, attention: dict) -> Path:
    """A demo_tiny segmentation export (random weights) as Stage 3 writes it: backbone and ``seg_head.*``."""
    vit = build_vfm("demo_tiny", img_size=32, attention=attention)
    head = LinearHead(vit.embed_dim, NUM_SEG_CLASSES, len(vit.blocks))
    state = {**vit.state_dict(), **{f"seg_head.{key}": value for key, value in head.state_dict().items()}}
    return save_export(state, path, {"model": "demo_tiny", "img_size": 32, "attention": attention_config(vit),
                                     "num_seg_classes": NUM_SEG_CLASSES, "seg_head": "linear"})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("resolution")
    val = ensure_demo_shards(root / "shards", {"val": 6})["val"]
    return {"export": str(_seg_export(root / "linear.safetensors", {"kind": "linear", "kernel": "elu1"})),
            "teacher": str(_seg_export(root / "softmax.safetensors", {"kind": "softmax"})), "val": val}


def test_table_and_plot_of_export_and_teacher(files: dict[str, str], tmp_path: Path) -> None:
    argv = [files["export"], "--sizes", "64", "32", "--teacher", files["teacher"], "--val", files["val"],
            "--data", "demo", "--out", str(tmp_path), *FAST]
    assert resolution.main(argv) == 0
    report = json.loads((tmp_path / "resolution-cpu.json").read_text())
    rows = {(r["img_size"], r["role"]): r for r in report["rows"]}
    assert list(rows) == [(32, "export"), (32, "teacher"), (64, "export"), (64, "teacher")]
    assert [r["attention"] for r in report["rows"]] == ["linear", "softmax"] * 2
    assert rows[32, "export"]["tokens"] == 8 * 8 + 1 and rows[64, "export"]["tokens"] == 16 * 16 + 1
    growth = {role: rows[64, role]["gflops"] / rows[32, role]["gflops"] for role in ("export", "teacher")}
    assert growth["teacher"] > growth["export"] > 1  # softmax attention's N² grows faster than linear attention's N
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["peak_gb"] > 0 and 0 <= row["miou"] <= 1
    table = (tmp_path / "resolution-cpu.md").read_text()
    assert report["device"] in table and "| 64 | 257 | export | linear |" in table and "## Export vs teacher" in table
    assert (tmp_path / "resolution-cpu.png").stat().st_size > 0


def test_results_show_paths_from_the_working_or_home_directory(files: dict[str, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed results name the files as the command was run, not the machine's directories."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("export", "teacher"):
        shutil.copy(files[name], work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(Path(files["val"]).parent.parent))
    argv = [str(work / "linear.safetensors"), "--sizes", "32", "--teacher", str(work / "softmax.safetensors"),
            "--val", files["val"], "--data", "demo", "--out", str(tmp_path / "out"), *FAST]
    assert resolution.main(argv) == 0
    report = json.loads((tmp_path / "out" / "resolution-cpu.json").read_text())
    assert report["export"] == "linear.safetensors" and report["val"] == "~/shards/val-000000.tar"
    assert report["command"].startswith("python -m adala.eval.resolution linear.safetensors --sizes 32 --teacher "
                                        "softmax.safetensors --val ~/shards/val-000000.tar --data demo --out ")
    assert str(tmp_path) in report["command"]  # a path outside both stays as given


def test_a_mask2former_export_is_rebuilt_with_the_sizes_it_recorded(files: dict[str, str], tmp_path: Path) -> None:
    """Sizes other than the defaults (64 wide, 10 queries): the head loads only if its recorded sizes are used."""
    pytest.importorskip("transformers")
    from adala.stages.seg_heads import build_head, head_metadata

    options = compose(["stage=finetune_seg", "stage.mask2former.hidden_dim=64", "stage.mask2former.num_queries=10",
                       "stage.mask2former.decoder_layers=2", "stage.mask2former.encoder_layers=1",
                       "stage.mask2former.feedforward=128"]).stage.mask2former
    attention = {"kind": "linear", "kernel": "elu1"}
    vit = build_vfm("demo_tiny", img_size=32, attention=attention)
    head = build_head("mask2former", embed_dim=64, depth=4, num_classes=NUM_SEG_CLASSES, options=options)
    state = {**vit.state_dict(), **{f"seg_head.{key}": value for key, value in head.state_dict().items()}}
    export = save_export(state, tmp_path / "m2f.safetensors", {
        "model": "demo_tiny", "img_size": 32, "attention": attention_config(vit), "num_seg_classes": NUM_SEG_CLASSES,
        **head_metadata("mask2former", options)})
    argv = [str(export), "--sizes", "32", "--val", files["val"], "--data", "demo", "--out", str(tmp_path), *FAST]
    assert resolution.main(argv) == 0
    rows = json.loads((tmp_path / "resolution-cpu.json").read_text())["rows"]
    assert rows[0]["role"] == "export" and 0 <= rows[0]["miou"] <= 1


def test_one_window_of_the_whole_image_scores_like_whole_images(files: dict[str, str]) -> None:
    """The demo transform resizes to size², so a window of the size covers the image: the same prediction."""
    data = resolution.data_config("demo", files["val"])
    export = resolution.entries(resolution.parse_args([files["export"], "--sizes", "48"]))[0]
    scores = [resolution.segmentation_miou(export, data, 48, whole=whole, device=resolution.torch.device("cpu"))
              for whole in (False, True)]
    assert scores[0] == pytest.approx(scores[1])


def test_random_softmax_reference_without_a_teacher(files: dict[str, str], tmp_path: Path) -> None:
    assert resolution.main([files["export"], "--sizes", "32", "--out", str(tmp_path), *FAST]) == 0
    rows = json.loads((tmp_path / "resolution-cpu.json").read_text())["rows"]
    assert [(r["role"], r["attention"], r["weights"], r["miou"]) for r in rows] == [
        ("export", "linear", files["export"], None), ("teacher", "softmax", None, None)]


def test_a_plain_weight_file_teacher_takes_the_exports_architecture(files: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "timm.safetensors"
    save_file(build_vfm("demo_tiny").state_dict(), str(weights))  # no adala metadata
    args = resolution.parse_args([files["export"], "--sizes", "32", "--teacher", str(weights)])
    teacher = resolution.entries(args)[1]
    assert (teacher.weights, teacher.meta["model"], teacher.segmenter) == (weights, "demo_tiny", False)


def test_evaluation_resize_grows_with_the_size() -> None:
    cityscapes = compose(["data=cityscapes"]).data  # scale [2048, 1024] around a 1024 crop
    assert resolution.eval_scale(cityscapes, 512) == [1024, 512]
    assert resolution.eval_scale(cityscapes, 2048) == [4096, 2048]
    assert resolution.eval_scale(compose(["data=demo"]).data, 512) is None


@pytest.mark.parametrize("extra, message", [
    (["--val", "x.tar"], "needs a segmentation export"),
    (["--teacher", "EXPORT"], "has linear attention"),
    (["--teacher", "missing.safetensors"], "--teacher missing.safetensors not found"),
    (["--batch", "0"], "must be positive"),
])
def test_bad_input_is_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str],
                                          message: str) -> None:
    vit = build_vfm("demo_tiny", attention={"kind": "linear", "kernel": "elu1"})
    export = save_export(vit.state_dict(), tmp_path / "plain.safetensors",
                         {"model": "demo_tiny", "img_size": 32, "attention": attention_config(vit)})
    extra = [str(export) if word == "EXPORT" else word for word in extra]
    assert resolution.main([str(export), "--sizes", "32", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("resolution-*"))
