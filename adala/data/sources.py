"""Source data sets on disk, listed as the samples a shard writer stores: which bytes make the image, its
class, its mask. Nothing is decoded here; every list is sorted, so the same tree always gives the same list.

Layouts (``SRC`` is the argument of ``python -m adala.data write``):

- ``imagefolder``: ``SRC/<class>/**/*.jpg`` (classes sorted by name → 0..C-1).
- ``in22k``: ImageNet-22K, ``SRC/<synset>/*.JPEG`` or ``SRC/<synset>.tar`` (one tar per synset, read in place).
- ``coco``: ``SRC/*.jpg`` (e.g. ``train2017/``), images only.
- ``in1k``: ImageNet-1K train as class folders; val as class folders too, or flat with ``--labels FILE``
  (lines ``<image> <synset or index>``, or Kaggle's ``LOC_val_solution.csv``).
- ``ade20k``: ``SRC/images/{training,validation}/*.jpg`` + ``SRC/annotations/{...}/*.png``.
- ``cityscapes``: ``SRC/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` +
  ``SRC/gtFine/<split>/<city>/*_gtFine_labelIds.png``.
"""
from __future__ import annotations

import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from adala.data.labelmaps import ADE20K_CLASSES, CITYSCAPES_CLASSES
from adala.errors import UserError

IMAGE_TYPES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # source suffix -> member extension


@dataclass(frozen=True, slots=True)  # slots: ImageNet-22K lists 14 million of these
class Blob:
    """The bytes of a file under the source root, or of a member inside a tar there (offset and size taken
    from its header, so it is read without opening the tar again)."""

    path: str  # relative to the source root
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read(self, root: Path) -> bytes:
        with open(root / self.path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


@dataclass(frozen=True, slots=True)
class SourceItem:
    key: str  # the sample's key in the shard: unique, no dots
    image: Blob
    image_type: str  # the image's member extension: jpg | png | webp
    bytes: int  # source bytes (image + mask), to plan shards by size
    label: Optional[int] = None
    mask: Optional[Blob] = None


@dataclass
class Listing:
    format: str
    root: Path
    items: list[SourceItem]
    classes: Optional[list[str]] = None  # class names by index
    seg_classes: Optional[list[str]] = None  # mask classes by train id (masks: 255 = not scored)
    mask_table: Optional[str] = None  # adala.data.labelmaps table applied to the masks
    left_out: list[str] = field(default_factory=list)  # sources without their annotation, not written


def list_source(format: str, root: str | os.PathLike, *, split: str, labels: Optional[str] = None) -> Listing:
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; SRC is the data set's folder")
    if labels is not None and format != "in1k":
        raise UserError("--labels is for --format in1k (a flat validation folder); class folders need none")
    listing = FORMATS[format](root, split, labels)
    if not listing.items:
        raise UserError(f"{root}: no images found for --format {format} --split {split}; see `python -m adala.data write --help` for the layout")
    return listing


def _imagefolder(root: Path, split: str, labels: Optional[str], *, stem_keys: bool = False) -> Listing:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [item for index, name in enumerate(classes)
             for item in _files(root, root / name, label=index, stem_keys=stem_keys)]
    return Listing("imagefolder", root, items, classes=classes)


def _in22k(root: Path, split: str, labels: Optional[str]) -> Listing:
    synsets = sorted((p for p in root.iterdir() if p.is_dir() or p.suffix == ".tar"), key=lambda p: p.stem)
    classes = [p.stem for p in synsets]

    def items_of(index: int) -> list[SourceItem]:
        path = synsets[index]
        return _tar_members(root, path, index) if path.is_file() else _files(root, path, label=index, stem_keys=True)

    with ThreadPoolExecutor(max_workers=16) as pool:  # reading tar headers is I/O-bound
        items = [item for chunk in pool.map(items_of, range(len(synsets))) for item in chunk]
    return Listing("in22k", root, items, classes=classes)


def _coco(root: Path, split: str, labels: Optional[str]) -> Listing:
    return Listing("coco", root, _files(root, root, label=None, stem_keys=True, recursive=False))


def _in1k(root: Path, split: str, labels: Optional[str]) -> Listing:
    if labels is None:
        listing = _imagefolder(root, split, None, stem_keys=True)
        if not listing.classes:
            raise UserError(f"{root} has no class folders; for a flat validation folder pass --labels FILE")
        listing.format = "in1k"
        return listing
    targets = read_labels(Path(labels))
    named = not all(t.isdigit() for t in targets.values())
    classes = sorted(set(targets.values())) if named else None
    index = {name: i for i, name in enumerate(classes or [])}
    items, left_out = [], []
    for item in _files(root, root, label=None, stem_keys=True, recursive=False):
        target = targets.get(Path(item.image.path).stem)
        if target is None:
            left_out.append(item.image.path)
            continue
        items.append(SourceItem(item.key, item.image, item.image_type, item.bytes, index[target] if named else int(target)))
    return Listing("in1k", root, items, classes=classes, left_out=left_out)


def _ade20k(root: Path, split: str, labels: Optional[str]) -> Listing:
    folder = {"train": "training", "val": "validation"}.get(split, split)
    images, masks = root / "images" / folder, root / "annotations" / folder
    _require(images, masks, layout="images/{training,validation}/*.jpg and annotations/{training,validation}/*.png")
    return _paired(root, "ade20k", images, lambda image: masks / f"{image.stem}.png", table="ade20k",
                   seg_classes=[str(i) for i in range(ADE20K_CLASSES)], key=lambda image: image.stem)


def _cityscapes(root: Path, split: str, labels: Optional[str]) -> Listing:
    images, masks = root / "leftImg8bit" / split, root / "gtFine" / split
    _require(images, masks, layout="leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png")

    def base(image: Path) -> str:
        return image.name[: -len("_leftImg8bit.png")]

    return _paired(root, "cityscapes", images, lambda image: masks / image.parent.name / f"{base(image)}_gtFine_labelIds.png",
                   table="cityscapes", seg_classes=list(CITYSCAPES_CLASSES), key=base,
                   pattern="*_leftImg8bit.png")


def _paired(root: Path, format: str, images: Path, mask_of: Callable[[Path], Path], *, table: str,
            seg_classes: list[str], key: Callable[[Path], str], pattern: str = "*") -> Listing:
    items, left_out = [], []
    for image in sorted(p for p in images.rglob(pattern) if p.suffix.lower() in IMAGE_TYPES):
        mask = mask_of(image)
        if not mask.is_file():
            left_out.append(str(image.relative_to(root)))
            continue
        size = image.stat().st_size + mask.stat().st_size
        items.append(SourceItem(sanitize(key(image)), Blob(str(image.relative_to(root))), IMAGE_TYPES[image.suffix.lower()],
                                size, mask=Blob(str(mask.relative_to(root)))))
    return Listing(format, root, items, seg_classes=seg_classes, mask_table=table, left_out=left_out)


def _files(root: Path, folder: Path, *, label: Optional[int], stem_keys: bool, recursive: bool = True) -> list[SourceItem]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    items = []
    for path in sorted(p for p in found if p.suffix.lower() in IMAGE_TYPES and p.is_file()):
        relative = path.relative_to(root)
        key = sanitize(path.stem if stem_keys else str(relative.with_suffix("")))
        items.append(SourceItem(key, Blob(str(relative)), IMAGE_TYPES[path.suffix.lower()], path.stat().st_size, label))
    return items


def _tar_members(root: Path, path: Path, label: int) -> list[SourceItem]:
    items = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            suffix = os.path.splitext(member.name)[1].lower()
            if member.isfile() and suffix in IMAGE_TYPES:
                blob = Blob(str(path.relative_to(root)), member.offset_data, member.size)
                items.append(SourceItem(sanitize(Path(member.name).stem), blob, IMAGE_TYPES[suffix], member.size, label))
    return sorted(items, key=lambda item: item.key)


def read_labels(path: Path) -> dict[str, str]:
    """Image stem -> label from ``<image> <label>`` lines (whitespace or comma separated; extra tokens, e.g.
    Kaggle's boxes after the synset, are ignored; a header line is skipped)."""
    if not path.is_file():
        raise UserError(f"--labels {path}: file not found")
    targets = {}
    for line in path.read_text().splitlines():
        fields = re.split(r"[,\s]+", line.strip())
        if len(fields) < 2 or fields[0] in ("ImageId", "image", "filename"):
            continue
        targets[Path(fields[0]).stem] = fields[1]
    if not targets:
        raise UserError(f"--labels {path}: no '<image> <label>' lines found")
    return targets


def sanitize(text: str) -> str:
    """A webdataset key: the text with every run of characters other than letters, digits, '-' and '_' (dots
    above all, which would split the key) replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def _require(*folders: Path, layout: str) -> None:
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; this format expects {layout}")


FORMATS: dict[str, Callable[[Path, str, Optional[str]], Listing]] = {
    "imagefolder": _imagefolder, "in22k": _in22k, "coco": _coco, "in1k": _in1k, "ade20k": _ade20k,
    "cityscapes": _cityscapes,
}
