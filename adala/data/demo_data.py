"""The demo's data set as webdataset shards: a pretraining split (teacher, Stages 1-2), a small labelled
fine-tuning split (Stage 3) and a held-out validation split, each from its own seed."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from adala.data.demo_images import NUM_CLASSES, NUM_SEG_CLASSES, render
from adala.data.tario import encode_png, write_samples
from adala.engine.rundir import cache_entry_lock
from adala.files import write_text_atomic

log = logging.getLogger(__name__)

SPLIT_SEEDS = {"pretrain": 0, "finetune": 1, "val": 2}
PER_SHARD = 1000
REQUEST = "demo.json"  # what the shards in a directory were written for; written last
LOCK = ".lock"  # held while the shards are checked or written: a second process waits, then reuses them


def _samples(split: str, count: int, size: int) -> Iterator[dict]:
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    for index in range(count):
        image, mask, label = render(rng, size)
        yield {"__key__": f"{split}-{index:07d}", "png": encode_png(image), "seg.png": encode_png(mask),
               "cls": str(label).encode()}


def ensure_demo_shards(
    directory: Path, counts: dict[str, int], size: int = 32, per_shard: int = PER_SHARD
) -> dict[str, str]:
    """Write the splits (shards + ``<split>.manifest.json``) into ``directory`` unless its ``demo.json`` says
    they are there already; returns each split's shard pattern. An interrupted write is redone next time; a
    process that finds another one writing waits for it and reuses its shards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / REQUEST
    wanted = {"counts": counts, "size": size, "per_shard": per_shard, "classes": NUM_CLASSES, "seg_classes": NUM_SEG_CLASSES}
    with cache_entry_lock(directory / LOCK, f"the demo shards in {directory}"):
        if not (record.is_file() and json.loads(record.read_text()).get("request") == wanted):
            log.info("writing the demo shards into %s", directory)
            record.unlink(missing_ok=True)
            shards = {}
            for split, count in counts.items():
                manifest = write_samples(_samples(split, count, size), directory, split=split, per_shard=per_shard,
                                         extra={"format": "demo", "classes": [str(c) for c in range(NUM_CLASSES)]})
                shards[split] = len(manifest["shards"])
            write_text_atomic(record, json.dumps({"request": wanted, "shards": shards}, indent=2) + "\n")
        shards = json.loads(record.read_text())["shards"]
    return {split: _pattern(directory, split, count) for split, count in shards.items()}


def _pattern(directory: Path, split: str, count: int) -> str:
    last = count - 1
    return str(directory / f"{split}-{{000000..{last:06d}}}.tar") if last else str(directory / f"{split}-000000.tar")
