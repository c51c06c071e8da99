"""Segmentation at the paper's protocol: the Mask2Former head on the ViT, sliding-window evaluation over whole
images, mIoU over ranks, ADE20K and Cityscapes shards from their real layouts, exact resume."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_layouts
from adala.config import compose, override
from adala.data.__main__ import main as data_main
from adala.data.pipeline import eval_stream, resolve_data
from adala.data.seg_transforms import RandomScaleCrop
from adala.data.transforms import build_transform
from adala.eval import MeanIoU
from adala.eval.sliding_window import sliding_window, window_starts
from adala.models import build_vfm, read_export_metadata
from adala.run import StageResult, run_stage
from adala.stages.common import backbone_and_head_groups
from adala.stages.finetune_seg import Segmenter
from adala.stages.seg_heads import build_head

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent
TINY_HEAD = ("stage.head=mask2former", "stage.mask2former.hidden_dim=64", "stage.mask2former.num_queries=10",
             "stage.mask2former.decoder_layers=2", "stage.mask2former.encoder_layers=1",
             "stage.mask2former.feedforward=128", "stage.mask2former.train_points=256")
ADE_CITYSCAPES = {"ade20k": ("ADEChallengeData2016", 150), "cityscapes": ("cityscapes", 19)}


def tiny_segmenter(num_classes: int = 4, window: tuple[int, int] | None = None) -> Segmenter:
    cfg = compose(["stage=finetune_seg", *TINY_HEAD])
    backbone = build_vfm("demo_tiny", img_size=16)
    head = build_head("mask2former", embed_dim=64, depth=4, num_classes=num_classes, options=cfg.stage.mask2former)
    return Segmenter(backbone, num_classes, head, window=window)


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """ADE20K and Cityscapes written from their real layouts by ``python -m adala.data write``: 8 training and 5
    validation images each, 2 per shard (so two ranks get uneven shares of the validation set)."""
    root = tmp_path_factory.mktemp("seg")
    data_layouts.ade20k(root / "src", train=8, val=5)
    data_layouts.cityscapes(root / "src", train=8, val=5)
    shards = {}
    for name, (folder, _) in ADE_CITYSCAPES.items():
        for split in ("train", "val"):
            assert data_main(["write", str(root / "src" / folder), str(root / name), "--format", name, "--split", split,
                              "--samples-per-shard", "2"]) == 0
        shards[name] = {split: str(root / name / f"{split}-{{000000..{count - 1:06d}}}.tar")
                        for split, count in (("train", 4), ("val", 3))}
    return shards


def test_mask2former_training_steps_lower_the_loss_with_the_backbone_at_a_tenth_of_the_lr() -> None:
    model = tiny_segmenter().train()
    groups = backbone_and_head_groups(("seg_head.",), 0.1)(model)
    assert {g["name"]: g["lr_scale"] for g in groups} == {"backbone": 0.1, "head": 1.0}
    assert sum(p.numel() for p in groups[1]["params"]) == sum(p.numel() for p in model.seg_head.parameters())
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": 2e-3 * g["lr_scale"]} for g in groups])
    images = torch.randn(2, 3, 16, 16)
    mask = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0).long()  # classes readable from the pixels
    mask[:, :2] = 255  # ignored rows
    losses = []
    for _ in range(5):
        out = model({"image": images, "mask": mask})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert set(out.scalars) == {"cross_entropy", "mask", "dice"}
    assert losses[-1] < 0.92 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_sliding_window_equals_whole_image_when_the_window_covers_it() -> None:
    model = tiny_segmenter().eval()
    images, mask = torch.randn(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)
    with torch.no_grad():
        whole = model({"image": images, "mask": mask}).prediction
        model.window = (16, 8)
        windowed = model({"image": images, "mask": mask}).prediction
    assert whole.shape == (2, 4, 16, 16)
    torch.testing.assert_close(windowed, whole)


def test_sliding_window_averages_overlapping_crops_into_the_image() -> None:
    """With a per-pixel predictor every crop agrees with the whole image, so overlaps and the padded last crops
    must average back to exactly the whole-image scores; a crop-dependent one shows the count map."""
    assert window_starts(20, 8, 5) == [0, 5, 10, 12] and window_starts(13, 8, 5) == [0, 5] and window_starts(6, 8, 5) == [0]
    conv = torch.nn.Conv2d(3, 5, 1)
    images = torch.randn(2, 3, 20, 13)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(conv, images, crop=8, stride=5), conv(images))
    ones = sliding_window(lambda x: torch.ones(x.shape[0], 1, *x.shape[-2:]) * x.shape[0], images, crop=8, stride=5)
    torch.testing.assert_close(ones, torch.full_like(ones, 2 * 4 * 2))  # 4 x 2 crops of 2 images: one forward of 16
    with pytest.raises(ValueError, match="stride"):
        sliding_window(conv, images, crop=8, stride=9)


def test_training_geometry_rescales_crops_pads_and_flips_image_and_mask_together() -> None:
    """A column ramp (8 × 32) through the random rescale (×0.5-2 of a 64 × 16 fit: 8 to 32 rows), 16² crop, padding
    and flip: image and mask keep showing the same columns, padding is 0 in the image and 255 in the mask."""
    geometry = RandomScaleCrop((64, 16), 16)
    ramp = torch.arange(32).repeat(8, 1)
    image = torch.stack([ramp * 4] * 3).to(torch.uint8)
    heights, flips = set(), 0
    for seed in range(20):
        torch.manual_seed(seed)
        pixels, mask = geometry(image, ramp.clone())
        assert pixels.shape == (3, 16, 16) and mask.shape == (16, 16)
        valid = mask != 255
        heights.add(int(valid[:, 0].sum()))
        assert (pixels[:, ~valid] == 0).all()
        columns = mask[0].float()
        flips += bool(columns[0] > columns[-1])
        torch.testing.assert_close(pixels[0][valid].float() / 4, mask[valid].float(), atol=1.0, rtol=0)
    assert min(heights) < 16 and max(heights) == 16 and 0 < flips < 20


def independent_miou(predictions: list[np.ndarray], truths: list[np.ndarray], num_classes: int) -> float:
    """mIoU per class as |P ∩ T| / |P ∪ T| over all pixels not ignored, mean over classes present in either."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, t in zip(predictions, truths):
            valid = t != 255
            inter += np.sum((p == c) & (t == c) & valid)
            union += np.sum(((p == c) | (t == c)) & valid)
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_crops_that_one_class_dominates_are_drawn_again() -> None:
    """Columns 0-69% of class 0, the rest class 1 (and an ignored strip): with cat_max_ratio 0.75 nearly every crop
    straddles the border with both classes at under 75% of its labelled pixels, as mmseg's check counts them
    (numpy here); drawing each crop once, most fall in the wide class-0 part."""
    labels = (torch.arange(100) >= 70).long().repeat(100, 1)
    labels[:, :5] = 255
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)

    def mmseg_balanced(mask: torch.Tensor) -> bool:
        values, counts = np.unique(mask.numpy(), return_counts=True)
        counts = counts[values != 255]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    share = {}
    for ratio in (0.75, 1.0):
        torch.manual_seed(0)
        crops = [RandomScaleCrop((100, 100), 32, ratio)(image, labels.clone())[1] for _ in range(60)]
        share[ratio] = sum(map(mmseg_balanced, crops)) / len(crops)
    assert share[0.75] >= 0.8 and share[1.0] <= 0.4, share


def test_mean_iou_matches_an_independent_count() -> None:
    rng = np.random.default_rng(0)
    metric, predictions, truths = MeanIoU(6), [], []
    for size in ((5, 7), (9, 4)):
        logits = torch.from_numpy(rng.normal(size=(1, 6, *size)))
        truth = rng.integers(0, 6, size=(1, *size))
        truth[0, 0] = 255
        metric.update(logits, {"mask": torch.from_numpy(truth)})
        predictions.append(logits.argmax(1).numpy()), truths.append(truth)
    assert metric.compute()["miou"] == pytest.approx(independent_miou(predictions, truths, 6), abs=1e-12)


@pytest.mark.parametrize("name", ["ade20k", "cityscapes"])
def test_label_handling_from_the_real_layouts(name: str, seg_shards: dict) -> None:
    """Masks read back through the evaluation stream equal the source PNGs mapped by the data set's own rule
    (ADE20K: 0 "other" ignored, 1..150 → 0..149; Cityscapes: label ids → the 19 train ids, the rest ignored), at
    the source resolution, while the image is resized to fit the protocol's scale."""
    folder, classes = ADE_CITYSCAPES[name]
    cfg = compose(["stage=finetune_seg", f"data={name}", override("data.train", seg_shards[name]["train"]),
                   override("data.val", seg_shards[name]["val"]), "data.workers=0"])
    assert cfg.data.num_seg_classes == classes and cfg.data.eval_transform == "seg_eval"
    transform = build_transform("seg_eval", img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(64, 24))
    batches = list(eval_stream(resolve_data(cfg.data), fields=("image", "mask"), transform=transform, batch_size=1,
                               rank=0, world_size=1))
    assert len(batches) == 5 and all(b["image"].shape == (1, 3, 24, 24) for b in batches)
    root = Path(seg_shards[name]["val"]).parent.parent / "src" / folder
    pngs = sorted((root / "annotations" / "validation").glob("*.png")) if name == "ade20k" else \
        sorted((root / "gtFine" / "val").rglob("*_labelIds.png"), key=lambda p: p.name)
    cityscapes = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                  27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    expected = []
    for png in pngs:
        raw = np.array(Image.open(png)).astype(np.int64)
        expected.append(np.where(raw == 0, 255, raw - 1) if name == "ade20k" else
                        np.vectorize(lambda v: cityscapes.get(int(v), 255))(raw))
    got = sorted((b["mask"][0].numpy() for b in batches), key=lambda m: m.tobytes())
    expected = sorted(expected, key=lambda m: m.tobytes())
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert any((e == 255).any() for e in expected) and max(e[e != 255].max() for e in expected) < classes


def stage_overrides(run_dir: Path, shards: dict[str, dict[str, str]], name: str, *extra: str) -> list[str]:
    """finetune_seg with the tiny Mask2Former on ``name``'s small shards: 16² crops, images resized to fit 64 × 24."""
    return ["stage=finetune_seg", f"data={name}", override("data.train", shards[name]["train"]),
            override("data.val", shards[name]["val"]), "data.workers=0", "data.shuffle_buffer=0", "data.crop_size=16",
            "data.scale=[64,24]", "stage.batch_size=2", "train.progress=false", "train.log_every=1",
            override("run_dir", run_dir), *TINY_HEAD, *extra]


@pytest.mark.multiprocess
def test_two_rank_evaluation_equals_one_rank(seg_shards: dict, tmp_path: Path) -> None:
    """The same weights (lr 0: the seeded initial ones, GroupNorm only) evaluated by sliding windows on 2 FSDP ranks
    and in 1 process: the same mIoU over the same 5 whole images, split 3 + 2 over the ranks."""
    from test_distributed import run, torchrun

    common = [*stage_overrides(tmp_path / "two", seg_shards, "ade20k"), "stage.optim.lr=0", "train.max_steps=1"]
    run(torchrun(2, "-m", "adala", *common, "strategy=fsdp"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = run_stage(compose([*common, override("run_dir", tmp_path / "one")])).metrics
    assert two["val_images"] == one["val_images"] == 5
    assert two["miou"] == pytest.approx(one["miou"], abs=1e-12)


STRATEGIES = [("strategy=ddp",), ("strategy=fsdp",), ("strategy=deepspeed", "strategy.zero_stage=2"),
              ("strategy=deepspeed", "strategy.zero_stage=3")]


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(o.split("=")[1] for o in s))
def test_mask2former_trains_checkpoints_and_exports_under_every_strategy(strategy: tuple[str, ...], seg_shards: dict,
                                                                          tmp_path: Path) -> None:
    """Two ranks: finite losses, a complete checkpoint, the export's head loads strictly into the head its recorded
    sizes describe, and the evaluation covers every validation image once."""
    from test_distributed import run, torchrun

    from adala.engine.checkpoint import COMPLETE_MARKER
    from adala.models.weights import read_state_dict
    from adala.stages.common import strip_prefix
    from adala.stages.seg_heads import stored_options

    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    argv = [*stage_overrides(tmp_path, seg_shards, "ade20k"), "train.max_steps=3", "train.save_every=2", *strategy]
    run(torchrun(2, "-m", "adala", *argv), timeout=600)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(np.isfinite(logged)), logged
    assert (tmp_path / "checkpoints" / "step-2" / COMPLETE_MARKER).exists()
    export = tmp_path / "export" / "model.safetensors"
    meta = read_export_metadata(export)
    head = build_head("mask2former", embed_dim=64, depth=4, num_classes=meta["num_seg_classes"],
                      options=stored_options(meta, None))
    head.load_state_dict(strip_prefix(read_state_dict(export), "seg_head."))
    assert json.loads((tmp_path / "metrics.json").read_text())["val_images"] == 5


@pytest.mark.slow
def test_resume_after_a_kill_is_exact(seg_shards: dict, tmp_path: Path) -> None:
    """A Mask2Former run killed (SIGKILL) after its step-3 checkpoint and resumed ends with the weights and
    losses of the run that was never interrupted."""
    from test_distributed import assert_same_weights, losses

    argv = stage_overrides(tmp_path / "ref", seg_shards, "cityscapes", "train.max_steps=6", "train.save_every=3",
                           "train.eval_every=4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process (OMP_NUM_THREADS=1): the same order of float sums
    try:
        reference = run_stage(compose(argv))
        kill_after_step_3_then_resume(argv, tmp_path / "killed")
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(tmp_path / "killed" / "export" / "model.safetensors", reference.export, 0)
    assert losses(tmp_path / "killed")[-3:] == losses(tmp_path / "ref")[-3:]
    # The export records the head's sizes, so it is rebuilt as trained (adala.eval.resolution, the task route).
    recorded = read_export_metadata(reference.export)["mask2former"]
    assert recorded == dataclasses.asdict(compose(argv).stage.mask2former) and recorded["hidden_dim"] == 64


def kill_after_step_3_then_resume(argv: list[str], killed: Path) -> StageResult:
    """Run ``argv`` into ``killed`` as its own process, SIGKILL it once step 3 is saved, resume it here."""
    from test_distributed import ENV, wait_for

    from adala.engine.checkpoint import COMPLETE_MARKER

    argv = [*argv, override("run_dir", killed)]
    process = subprocess.Popen([sys.executable, "-m", "adala", *argv], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed / "checkpoints" / "step-3" / COMPLETE_MARKER).exists(), process, "step 3 was saved")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "export").exists(), "the run finished before the kill; the test proves nothing"
    return run_stage(compose([*argv, "resume=auto"]))


def test_head_and_window_are_checked_before_work_starts(seg_shards: dict, tmp_path: Path) -> None:
    from adala.errors import UserError
    from adala.run import validate

    base = stage_overrides(tmp_path, seg_shards, "ade20k", "train.max_steps=1")
    with pytest.raises(UserError, match="unknown stage.head 'upernet'; use one of linear, mask2former"):
        validate(compose([*base, "stage.head=upernet"]))
    with pytest.raises(UserError, match="stage.eval_stride must be between 1 and the crop"):
        validate(compose([*base, "stage.eval_crop=8", "stage.eval_stride=9"]))
    with pytest.raises(UserError, match="hidden_dim must be a multiple of 32"):
        validate(compose([*base, "stage.mask2former.hidden_dim=48"]))
    with pytest.raises(UserError, match="must name 4 of the model's 4 blocks"):
        bad_blocks = compose(["stage=finetune_seg", *TINY_HEAD, "stage.mask2former.blocks=[0,1,2,4]"])
        build_head("mask2former", embed_dim=64, depth=4, num_classes=3, options=bad_blocks.stage.mask2former)
    with pytest.raises(UserError, match=r"data.cat_max_ratio is the largest share .* in \(0, 1\]"):
        validate(compose([*base, "data.cat_max_ratio=0"]))
    cfg = validate(compose(stage_overrides(tmp_path, seg_shards, "cityscapes", "train.max_steps=1")))
    assert cfg.model.img_size == 16 and cfg.data.scale == [64, 24], "data.crop_size is model.img_size's default"
    assert cfg.data.cat_max_ratio == 0.75  # both protocols redraw crops that one class dominates
    assert compose(["stage=finetune_seg", "data=cityscapes"]).data.crop_size == 1024
