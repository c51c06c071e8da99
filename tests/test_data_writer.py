"""The shard writer on small trees laid out like the real data sets: every format written and read back
(original image bytes, labels, masks through the data set's label table), reproducible to the byte, and an
interrupted write resumed."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adala.config import DataConfig
from adala.data.__main__ import main
from adala.data.opener import Reader
from adala.data.pipeline import eval_stream, resolve_data
from adala.data.skips import Skips
from adala.data.sources import list_source
from adala.data.transforms import build_transform
from adala.data.writer import WriteOptions, write_listing
from adala.errors import UserError
from tests.data_layouts import SIZE, encoded, loc_val_solution, photo, put, synset_tar

PLAIN = build_transform("plain", img_size=SIZE, mean=(0.0,) * 3, std=(1.0,) * 3)  # identity at SIZE: pixels / 255


def read_shards(out: Path, split: str = "train") -> dict[str, dict]:
    """Raw samples by key, straight from the tars."""
    manifest = json.loads((out / f"{split}.manifest.json").read_text())
    found = {}
    for entry in manifest["shards"]:
        found.update({s["__key__"]: s for s in Reader().samples(str(out / entry["name"]), Skips())})
    assert len(found) == manifest["samples"]
    return found


def through_pipeline(out: Path, fields: tuple[str, ...], split: str = "train") -> list[dict[str, torch.Tensor]]:
    manifest = json.loads((out / f"{split}.manifest.json").read_text())
    data = DataConfig(val=f"{out}/{split}-{{000000..{len(manifest['shards']) - 1:06d}}}.tar")
    stream = eval_stream(resolve_data(data), fields=fields, transform=PLAIN, batch_size=64, rank=0, world_size=1)
    batches = list(stream)
    assert sum(stream.counters().values()) == 0
    return batches


def write(format: str, src: Path, out: Path, **options: object) -> dict:
    split = str(options.pop("split", "train"))
    labels = options.pop("labels", None)
    listing = list_source(format, src, split=split, labels=labels)
    return write_listing(listing, out, WriteOptions(split=split, samples_per_shard=2, **options))


def test_imagefolder_and_in1k_train(tmp_path: Path) -> None:
    src = tmp_path / "src"
    sources = {"cat_a": put(src / "cat" / "a.jpg", photo(0)), "cat_b": put(src / "cat" / "b.JPEG", photo(1)),
               "dog_a": put(src / "dog" / "a.jpg", photo(2)), "dog_deep_c": put(src / "dog" / "deep" / "c.png", photo(3, "PNG"))}
    (src / "dog" / "notes.txt").write_text("not an image")
    manifest = write("imagefolder", src, tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog"] and manifest["samples"] == 4 and len(manifest["shards"]) == 2
    samples = read_shards(tmp_path / "out")
    for key, data in sources.items():
        member = "png" if key.endswith("_c") else "jpg"
        assert samples[key][member] == data, "images are stored as their original bytes"
        assert int(samples[key]["cls"]) == (0 if key.startswith("cat") else 1)
    pixels = {int(label): image for batch in through_pipeline(tmp_path / "out", ("image", "label"))
              for label, image in zip(batch["label"], batch["image"])}
    assert sorted(pixels) == [0, 1]
    with pytest.raises(UserError, match="occur twice, e.g. 'a'"):  # in1k keys are file stems, unique in ImageNet
        write("in1k", src, tmp_path / "in1k")
    (src / "dog" / "a.jpg").rename(src / "dog" / "d.jpg")
    write("in1k", src, tmp_path / "in1k")
    assert sorted(read_shards(tmp_path / "in1k")) == ["a", "b", "c", "d"]


def test_in1k_val_with_a_labels_file(tmp_path: Path) -> None:
    src = tmp_path / "val"
    for index in range(1, 6):
        put(src / f"ILSVRC2012_val_{index:08d}.JPEG", photo(index))
    synsets = {1: "n02", 2: "n01", 3: "n03", 4: "n01"}  # image 5 has no label: left out
    (tmp_path / "val.txt").write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {s}\n" for i, s in synsets.items()))
    loc_val_solution(tmp_path / "LOC_val_solution.csv", {f"ILSVRC2012_val_{i:08d}": s for i, s in synsets.items()})
    for labels in ("val.txt", "LOC_val_solution.csv"):
        out = tmp_path / labels.replace(".", "_")
        manifest = write("in1k", src, out, split="val", labels=str(tmp_path / labels))
        assert manifest["classes"] == ["n01", "n02", "n03"] and manifest["left_out"] == ["ILSVRC2012_val_00000005.JPEG"]
        got = {key: int(s["cls"]) for key, s in read_shards(out, "val").items()}
        assert got == {f"ILSVRC2012_val_{i:08d}": ["n01", "n02", "n03"].index(s) for i, s in synsets.items()}


def test_in22k_synset_tars_and_folders(tmp_path: Path) -> None:
    src = tmp_path / "in22k"
    inside = {f"n001_{i}": photo(10 + i) for i in range(3)}
    synset_tar(src / "n001.tar", {f"{key}.JPEG": data for key, data in inside.items()})
    folder = {"n002_0": put(src / "n002" / "n002_0.JPEG", photo(20))}
    manifest = write("in22k", src, tmp_path / "out")
    assert manifest["classes"] == ["n001", "n002"]
    samples = read_shards(tmp_path / "out")
    for key, data in {**inside, **folder}.items():
        assert samples[key]["jpg"] == data and int(samples[key]["cls"]) == (0 if key.startswith("n001") else 1)
    assert len(torch.cat([b["label"] for b in through_pipeline(tmp_path / "out", ("image", "label"))])) == 4


def test_coco_images_only(tmp_path: Path) -> None:
    src = tmp_path / "train2017"
    sources = {f"{i:012d}": put(src / f"{i:012d}.jpg", photo(i)) for i in (9, 25, 30)}
    manifest = write("coco", src, tmp_path / "out")
    assert manifest["classes"] is None and manifest["samples"] == 3
    samples = read_shards(tmp_path / "out")
    assert {key: s["jpg"] for key, s in samples.items()} == sources and all("cls" not in s for s in samples.values())
    images = torch.cat([b["image"] for b in through_pipeline(tmp_path / "out", ("image",))])
    expected = {bytes(np.array(Image.open(io.BytesIO(data))).tobytes()) for data in sources.values()}
    assert {bytes((img * 255).round().byte().permute(1, 2, 0).numpy().tobytes()) for img in images} == expected


def test_ade20k_masks_drop_other_and_shift_down(tmp_path: Path) -> None:
    src = tmp_path / "ADEChallengeData2016"
    values = np.array([0, 1, 2, 150], np.uint8).repeat(SIZE * SIZE // 4).reshape(SIZE, SIZE)
    for split, folder in (("train", "training"), ("val", "validation")):
        put(src / "images" / folder / f"ADE_{split}_00000001.jpg", photo(1))
        put(src / "annotations" / folder / f"ADE_{split}_00000001.png", encoded(values, "PNG"))
    put(src / "images" / "training" / "ADE_train_00000002.jpg", photo(2))  # no annotation: left out
    manifest = write("ade20k", src, tmp_path / "out")
    assert manifest["samples"] == 1 and manifest["left_out"] == ["images/training/ADE_train_00000002.jpg"]
    assert len(manifest["seg_classes"]) == 150 and manifest["ignore_index"] == 255
    write("ade20k", src, tmp_path / "out", split="val")
    for split in ("train", "val"):
        (batch,) = through_pipeline(tmp_path / "out", ("image", "mask"), split)
        mask = batch["mask"][0]
        assert sorted(mask.unique().tolist()) == [0, 1, 149, 255]
        assert torch.equal(mask, torch.from_numpy(np.where(values == 0, 255, values.astype(np.int64) - 1)))


def test_cityscapes_label_ids_become_train_ids_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "cityscapes"
    label_ids = np.array([0, 7, 26, 33], np.uint8).repeat(SIZE * SIZE // 4).reshape(SIZE, SIZE)  # unlabeled, road, car, bicycle
    for city, frame in (("aachen", "000000_000019"), ("bochum", "000001_000042"), ("bochum", "000002_000007")):
        put(src / "leftImg8bit" / "train" / city / f"{city}_{frame}_leftImg8bit.png", photo(len(city), "PNG"))
        put(src / "gtFine" / "train" / city / f"{city}_{frame}_gtFine_labelIds.png", encoded(label_ids, "PNG"))
    assert main(["write", str(src), str(tmp_path / "out"), "--format", "cityscapes", "--samples-per-shard", "2"]) == 0
    assert "3 samples in 2 shards" in capsys.readouterr().out
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["aachen_000000_000019", "bochum_000001_000042", "bochum_000002_000007"]
    masks = torch.cat([b["mask"] for b in through_pipeline(tmp_path / "out", ("image", "mask"))])
    expected = {0: 255, 7: 0, 26: 13, 33: 18}
    for label_id, train_id in expected.items():
        assert (masks[:, label_ids == label_id] == train_id).all(), f"labelId {label_id} -> trainId {train_id}"
    assert main(["write", str(tmp_path / "missing"), str(tmp_path / "o2"), "--format", "cityscapes"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for index in range(7):
        put(src / f"c{index % 3}" / f"{index}.jpg", photo(index))
    write("imagefolder", src, tmp_path / "one", processes=1)
    write("imagefolder", src, tmp_path / "two", processes=2)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert sorted(one) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar", "train.manifest.json"]
    assert one == two


def test_interrupted_write_continues_where_it_stopped(tmp_path: Path) -> None:
    src = tmp_path / "train2017"
    for index in range(10):
        put(src / f"{index:012d}.jpg", photo(index))
    write("coco", src, tmp_path / "reference", seed=None)
    out = tmp_path / "out"
    listing = list_source("coco", src, split="train")
    vanished = src / f"{6:012d}.jpg"
    kept = vanished.read_bytes()
    vanished.unlink()  # a source that fails mid-way stops the write, as a kill would
    with pytest.raises(UserError, match="run the same command again"):
        write_listing(listing, out, WriteOptions(samples_per_shard=2, seed=None))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert sorted(finished) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(out.glob(".*tmp*")), "the failed shard's temporary file is removed"
    assert not (out / "train.manifest.json").exists()
    (out / ".train-000003.tar.tmp-99999").write_bytes(b"half a shard")  # as left by a kill mid-shard
    vanished.write_bytes(kept)
    write("coco", src, out, seed=None)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[012].tar")} == finished, "finished shards kept"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}
