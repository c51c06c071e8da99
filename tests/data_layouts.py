"""Small data sets laid out on disk as their publishers distribute them, and their shards written by the README's
command, ``python -m adala.data write``.

The trees mirror the README's ``/datasets/...`` paths under one root: ``imagenet22k/`` (synset tars and synset
folders), ``coco/train2017/``, ``imagenet/train/<synset>/``, ``imagenet/val/`` (flat) with Kaggle's
``imagenet/LOC_val_solution.csv``, ``ADEChallengeData2016/`` and ``cityscapes/``. Images are tiny (16 x 16) random
photos; masks hold the data set's own label values. The shards land under another root as ``<name>/<split>-*.tar``,
like the README's ``/data/...`` paths.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

SIZE = 16
CITYSCAPES_LABEL_IDS = (0, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)  # unlabeled + the 19 scored


def encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def photo(seed: int, format: str = "JPEG") -> bytes:
    return encoded(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), format)


def mask(seed: int, values: tuple[int, ...] | range) -> bytes:
    """A PNG label map drawn from ``values``."""
    choice = np.random.default_rng(seed).choice(np.asarray(values, dtype=np.uint8), (SIZE, SIZE))
    return encoded(choice, "PNG")


def synset_tar(path: Path, members: dict[str, bytes]) -> None:
    """ImageNet-22K's per-synset tar: ``<name>`` members holding the image bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def loc_val_solution(path: Path, synsets: dict[str, str]) -> None:
    """Kaggle's ``LOC_val_solution.csv``: image id, then boxes as ``<synset> x0 y0 x1 y1`` repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ImageId,PredictionString\n" + "".join(
        f"{image},{synset} 1 2 30 40 {synset} 5 6 7 8\n" for image, synset in synsets.items()))


def synset(index: int) -> str:
    return f"n{1440764 + index * 37:08d}"


def imagenet22k(root: Path, *, synsets: int, per_synset: int) -> Path:
    """``root/imagenet22k``: even synsets as ``<synset>.tar``, odd ones as ``<synset>/`` folders."""
    top = root / "imagenet22k"
    for s in range(synsets):
        name = synset(s)
        images = {f"{name}_{i}.JPEG": photo(s * 1000 + i) for i in range(per_synset)}
        if s % 2 == 0:
            synset_tar(top / f"{name}.tar", images)
        else:
            for file, data in images.items():
                put(top / name / file, data)
    return top


def coco(root: Path, *, images: int) -> Path:
    """``root/coco/train2017/<12-digit id>.jpg``."""
    top = root / "coco" / "train2017"
    for i in range(images):
        put(top / f"{9 + 7 * i:012d}.jpg", photo(50000 + i))
    return top


def imagenet1k(root: Path, *, classes: int, per_class: int, val: int) -> Path:
    """``root/imagenet/train/<synset>/<synset>_<n>.JPEG``, the flat ``root/imagenet/val/ILSVRC2012_val_*.JPEG`` and
    ``root/imagenet/LOC_val_solution.csv`` labelling it."""
    top = root / "imagenet"
    for c in range(classes):
        for i in range(per_class):
            put(top / "train" / synset(c) / f"{synset(c)}_{i}.JPEG", photo(60000 + c * 1000 + i))
    labels = {}
    for i in range(1, val + 1):
        image = f"ILSVRC2012_val_{i:08d}"
        put(top / "val" / f"{image}.JPEG", photo(70000 + i))
        labels[image] = synset(i % classes)
    loc_val_solution(top / "LOC_val_solution.csv", labels)
    return top


def ade20k(root: Path, *, train: int, val: int) -> Path:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_<split>_<n>.{jpg,png}``;
    masks hold 0 ("other") and the classes 1-150."""
    top = root / "ADEChallengeData2016"
    for split, folder, count in (("train", "training", train), ("val", "validation", val)):
        for i in range(1, count + 1):
            put(top / "images" / folder / f"ADE_{split}_{i:08d}.jpg", photo(80000 + i + (0 if split == "train" else 50000)))
            put(top / "annotations" / folder / f"ADE_{split}_{i:08d}.png", mask(i, range(151)))
    return top


def cityscapes(root: Path, *, train: int, val: int) -> Path:
    """``root/cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and the matching
    ``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (label ids, not train ids)."""
    top = root / "cityscapes"
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            city = cities[split][i % 2]
            base = f"{city}_{i:06d}_000019"
            put(top / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", photo(90000 + i + (0 if split == "train" else 50000), "PNG"))
            put(top / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", mask(i, CITYSCAPES_LABEL_IDS))
    return top


@dataclass(frozen=True)
class Write:
    """One ``python -m adala.data write`` run: source folder under the sources root, data set name (the shard folder
    under the shards root), format, split and shard size."""

    src: str
    name: str
    format: str
    split: str
    samples_per_shard: int
    labels: Optional[str] = None  # relative to the sources root

    def argv(self, sources: Path, shards: Path) -> list[str]:
        argv = ["write", str(sources / self.src), str(shards / self.name), "--format", self.format, "--split", self.split,
                "--samples-per-shard", str(self.samples_per_shard), "--processes", "1"]
        return argv + (["--labels", str(sources / self.labels)] if self.labels else [])


# Sizes: the Stage-3 training sets hold enough samples and shards for the README's largest launch to pass the
# epoch-mode check (2 nodes x 8 GPUs x 8 workers = 128 readers, a batch of 8 each).
STAGE3_TRAIN, STAGE3_SHARDS = 1024, 128
WRITES = (
    Write("imagenet22k", "in22k", "in22k", "train", 4),
    Write("coco/train2017", "coco", "coco", "train", 4),
    Write("imagenet/train", "in1k", "in1k", "train", STAGE3_TRAIN // STAGE3_SHARDS),
    Write("imagenet/val", "in1k", "in1k", "val", 2, labels="imagenet/LOC_val_solution.csv"),
    Write("ADEChallengeData2016", "ade20k", "ade20k", "train", STAGE3_TRAIN // STAGE3_SHARDS),
    Write("ADEChallengeData2016", "ade20k", "ade20k", "val", 2),
    Write("cityscapes", "cityscapes", "cityscapes", "train", STAGE3_TRAIN // STAGE3_SHARDS),
    Write("cityscapes", "cityscapes", "cityscapes", "val", 2),
)


def write_sources(root: Path) -> Path:
    """Every data set's source tree under ``root`` (about 5,400 tiny files, 22 MB, 2-3 s)."""
    imagenet22k(root, synsets=6, per_synset=8)
    coco(root, images=32)
    imagenet1k(root, classes=8, per_class=STAGE3_TRAIN // 8, val=32)
    ade20k(root, train=STAGE3_TRAIN, val=32)
    cityscapes(root, train=STAGE3_TRAIN, val=32)
    return root


def write_shards(sources: Path, shards: Path) -> dict[tuple[str, str], str]:
    """Run ``python -m adala.data write`` for every entry of ``WRITES``; returns each (name, split)'s shard
    pattern, e.g. ``.../in1k/train-{000000..000127}.tar`` (about 5 s, 14 MB)."""
    from adala.data.__main__ import main

    patterns = {}
    for write in WRITES:
        if main(write.argv(sources, shards)) != 0:
            raise RuntimeError(f"python -m adala.data {' '.join(write.argv(sources, shards))} failed")
        patterns[write.name, write.split] = shard_pattern(shards / write.name, write.split)
    return patterns


def shard_pattern(folder: Path, split: str) -> str:
    """The brace pattern naming every ``<split>-NNNNNN.tar`` in ``folder``."""
    count = len(list(folder.glob(f"{split}-[0-9]*.tar")))
    if not count:
        raise FileNotFoundError(f"no {split} shards in {folder}")
    return f"{folder}/{split}-{{000000..{count - 1:06d}}}.tar"
