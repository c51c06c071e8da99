"""``adala report`` on small real runs, its parts (per-block error, PCA maps), Stage 2 with only Q/K/V trained,
and the kernel sweep."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from adala.__main__ import main
from adala.config import compose, override
from adala.errors import UserError
from adala.eval import figures
from adala.eval.block_error import relative_block_errors
from adala.eval.students import LINEARIZED
from adala.eval.pca import PatchPCA, orient
from adala.models import build_vfm, read_export_metadata
from adala.run import run_stage, validate


def stage(run_dir: Path, *extra: str) -> list[str]:
    return [override("run_dir", run_dir), "data=demo", "train.log_every=1", "train.progress=false",
            "stage.batch_size=8", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_shards: dict[str, str], random_teacher: str) -> dict[str, Path]:
    """Stage 1, Stage 2 with and without it, and a Stage-3 run that evaluates while training, fine-tuned from an
    export Stage 2 wrote on its way."""
    root = tmp_path_factory.mktemp("runs")
    common = (override("model.weights", random_teacher), override("data.train", demo_shards["pretrain"]))
    s1 = run_stage(compose(stage(root / "s1", "stage=align_attention", *common, "train.max_steps=6")))
    run_stage(compose(stage(root / "s2", "stage=align_features", *common, "train.max_steps=4", "train.export_every=2",
                            override("stage.init", s1.export))))
    run_stage(compose(stage(root / "s2_without_s1", "stage=align_features", *common, "train.max_steps=4")))
    run_stage(compose(stage(root / "cls", "stage=finetune_cls", override("data.train", demo_shards["finetune"]),
                            override("data.val", demo_shards["val"]), "train.max_steps=4", "train.eval_every=2",
                            override("stage.init", root / "s2" / "export" / "step-2.safetensors"))))
    return {name: root / name for name in ("s1", "s2", "s2_without_s1", "cls")}


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_report_draws_every_figure_with_its_numbers(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", *map(str, runs.values()), "--out", str(out), "--num-images", "8", "--pca-images", "3"]) == 0
    data = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(data) == {"loss", "stage1_blocks", "val_metrics", "block_error", "pca"}
    for name, record in data.items():
        assert png_size(out / f"{name}.png") == (record["width"], record["height"]), name

    loss = data["loss"]
    assert loss["panels"] == ["Stage 1: attention alignment", "Stage 2: feature alignment", "Stage 3: classification"]
    assert (loss["width"], loss["height"]) == figures.grid_size(1, 3)
    assert set(loss["runs"]["align_features"]) == {"s2", "s2_without_s1"}  # Fig. 7: both Stage-2 runs overlaid
    logged = [json.loads(line) for line in (runs["s1"] / "log.jsonl").read_text().splitlines()]
    assert loss["runs"]["align_attention"]["s1"] == {"step": [r["step"] for r in logged], "loss": [r["loss"] for r in logged]}

    blocks = data["stage1_blocks"]
    assert blocks["panels"] == ["block00", "block01", "block02", "block03"]
    assert (blocks["width"], blocks["height"]) == figures.grid_size(1, 4)
    assert blocks["runs"]["loss/block02"]["s1"]["loss"] == [r["loss/block02"] for r in logged]

    metrics = data["val_metrics"]
    assert metrics["panels"] == ["val/top1", "top1 by export"]
    assert metrics["runs"]["val/top1"]["cls"]["step"] == [2, 4]  # train.eval_every=2
    final = json.loads((runs["cls"] / "metrics.json").read_text())["top1"]
    assert metrics["runs"]["top1 by export"] == {"s2": {"step": [2], "value": [final]}}  # paper Fig. 10

    errors = data["block_error"]["block_errors"]
    assert list(errors) == [LINEARIZED, "s1", "s2", "s2_without_s1"]  # Stage-3 runs are no students of the teacher
    assert all(len(e) == 4 and all(0 < v < float("inf") for v in e) for e in errors.values())

    pca = data["pca"]
    assert pca["panels"] == ["input", "teacher", LINEARIZED, "s1", "s2", "s2_without_s1"]
    assert (pca["width"], pca["height"]) == figures.grid_size(3, 6, figures.IMAGE_PANEL_PX)

    page = (out / "index.html").read_text()
    assert all(f'src="{name}.png"' in page for name in data) and "align_features" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"report/{name}" for name in data)


def test_report_refuses_what_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_block_error_is_zero_for_the_teacher_and_grows_from_a_perturbed_block() -> None:
    teacher = build_vfm("demo_tiny").eval()
    images = [torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    assert relative_block_errors(teacher, copy.deepcopy(teacher), images) == [0.0] * 4
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.blocks[2].mlp.fc2.weight.add_(0.05 * torch.randn_like(student.blocks[2].mlp.fc2.weight))
    errors = relative_block_errors(teacher, student, images)
    assert errors[:2] == [0.0, 0.0]
    assert errors[2] > 0 and errors[3] > 0


def test_pca_colours_do_not_change_with_signs() -> None:
    teacher = torch.randn(2, 6, 6, 16).exp()  # skewed, like real features
    student = teacher + 0.1 * torch.randn_like(teacher)
    colours = PatchPCA.fit(teacher)
    expected = colours.rgb(student)
    assert expected.shape == (2, 6, 6, 3) and 0 <= expected.min() and expected.max() <= 1 and expected.std() > 0.1
    # features of the opposite sign: the same directions, the same colours
    assert torch.allclose(PatchPCA.fit(-teacher).rgb(-student), expected, atol=1e-5)
    # a component returned with the other sign is turned back
    centred = (teacher - teacher.mean((0, 1, 2))).reshape(-1, 16).double()
    components = torch.linalg.svd(centred, full_matrices=False)[2][:3]
    flipped = components * torch.tensor([[-1.0], [1.0], [-1.0]], dtype=torch.float64)
    assert torch.equal(orient(flipped, centred), orient(components, centred))


def test_stage2_trains_only_qkv_when_asked(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    common = (override("model.weights", random_teacher), override("data.train", demo_shards["pretrain"]))
    with pytest.raises(UserError, match="use all or qkv"):
        validate(compose(stage(tmp_path / "bad", "stage=align_features", *common, "train.max_steps=3",
                               "stage.trainable=qk")))
    with pytest.raises(UserError, match="both choose what trains"):
        validate(compose(stage(tmp_path / "bad", "stage=align_features", *common, "train.max_steps=3",
                               "stage.trainable=qkv", "stage.lora=4")))
    result = run_stage(compose(stage(tmp_path / "qkv", "stage=align_features", *common, "train.max_steps=3",
                                     "stage.trainable=qkv", "stage.optim.lr=1e-2")))
    start = build_vfm("demo_tiny", weights=random_teacher, attention={"kind": "linear"}).state_dict()
    trained = build_vfm("demo_tiny", weights=result.export).state_dict()
    changed = {name for name, value in start.items() if not torch.equal(value, trained[name])}
    assert changed == {f"blocks.{i}.attn.qkv.{p}" for i in range(4) for p in ("weight", "bias")}
    assert "lr/qkv" in json.loads((tmp_path / "qkv" / "log.jsonl").read_text().splitlines()[0])


def test_kernel_sweep_overlays_the_stage1_losses(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    args = ["sweep-kernels", "attention.kernel=elu1,relu", *stage(tmp_path / "sweep"), "train.max_steps=3",
            override("model.weights", random_teacher), override("data.train", demo_shards["pretrain"])]
    assert main([*args, "stage=align_features"]) == 2
    assert "sweep-kernels runs stage=align_attention" in capsys.readouterr().err
    assert main([args[0], "--check", *args[1:]]) == 0
    assert capsys.readouterr().out.count("config ok") == 2 and not (tmp_path / "sweep").exists()
    assert main(args) == 0
    loss = json.loads((tmp_path / "sweep" / "report" / "loss.json").read_text())
    assert list(loss["runs"]) == ["align_attention"] and set(loss["runs"]["align_attention"]) == {"elu1", "relu"}
    blocks = json.loads((tmp_path / "sweep" / "report" / "stage1_blocks.json").read_text())
    assert all(set(runs) == {"elu1", "relu"} for runs in blocks["runs"].values())
    for kernel in ("elu1", "relu"):
        assert read_export_metadata(tmp_path / "sweep" / kernel / "export" / "model.safetensors")["attention"]["kernel"] == kernel
