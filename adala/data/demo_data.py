"""The demo's data set as webdataset shards: a pretraining split (teacher, Stages 1-2), a small labelled
fine-tuning split (Stage 3) and a held-out validation split, each from its own seed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from adala.data.demo_images import NUM_CLASSES, NUM_SEG_CLASSES, render
from adala.data.shards import encode_png, write_shards

SPLIT_SEEDS = {"pretrain": 0, "finetune": 1, "val": 2}
PER_SHARD = 1000
MANIFEST = "manifest.json"


def _samples(split: str, count: int, size: int) -> Iterator[dict]:
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    for index in range(count):
        image, mask, label = render(rng, size)
        yield {"__key__": f"{split}-{index:07d}", "png": encode_png(image), "seg.png": encode_png(mask), "cls": str(label)}


def ensure_demo_shards(
    directory: Path, counts: dict[str, int], size: int = 32, per_shard: int = PER_SHARD
) -> dict[str, str]:
    """Write the splits into ``directory`` unless its manifest says they are there already; returns each split's
    shard pattern. The manifest is written last, so an interrupted write is redone next time."""
    manifest_path = directory / MANIFEST
    wanted = {"counts": counts, "size": size, "per_shard": per_shard, "classes": NUM_CLASSES, "seg_classes": NUM_SEG_CLASSES}
    if not (manifest_path.is_file() and json.loads(manifest_path.read_text()).get("request") == wanted):
        shards = {}
        for split, count in counts.items():
            for old in directory.glob(f"{split}-*.tar"):
                old.unlink()
            shards[split] = [p.name for p in write_shards(_samples(split, count, size), directory, prefix=split, per_shard=per_shard)]
        manifest_path.write_text(json.dumps({"request": wanted, "shards": shards}, indent=2) + "\n")
    shards = json.loads(manifest_path.read_text())["shards"]
    return {split: _pattern(directory, names) for split, names in shards.items()}


def _pattern(directory: Path, names: list[str]) -> str:
    split = names[0].rsplit("-", 1)[0]
    last = len(names) - 1
    return str(directory / f"{split}-{{000000..{last:06d}}}.tar") if last else str(directory / names[0])
