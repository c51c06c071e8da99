"""Write a listed source data set as webdataset shards, in parallel, resumable, byte for byte reproducible.

The listing is put in a fixed order (sorted, then shuffled with a seed so every shard mixes classes) and cut
into shards by sample count and/or source bytes; that plan depends only on the source, so the same source
always gives the same shards. Each shard is written by a worker process under a temporary name and renamed
when complete; a small record next to it (``.<shard>.json``: the manifest entry plus a digest of the sources
it holds) marks it done. A re-run keeps every shard whose record matches the plan and writes the rest; the
manifest ``<split>.manifest.json`` is written last and the records removed.

Images are stored as their original bytes; masks go through the data set's label table (``labelmaps``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from adala.data.labelmaps import IGNORE, remap_mask
from adala.data.manifest import manifest_name, read_manifest, write_manifest
from adala.data.opener import Reader
from adala.data.sources import Listing, SourceItem
from adala.data.tario import remove_other_shards, shard_name, write_tar
from adala.errors import UserError
from adala.files import write_text_atomic

log = logging.getLogger("adala.data")

LAYOUT_VERSION = 1  # bump when the same sources would give different shard bytes


@dataclass(frozen=True)
class WriteOptions:
    split: str = "train"
    samples_per_shard: int = 1000
    shard_bytes: Optional[int] = None  # also close a shard before its source bytes pass this
    processes: int = 1
    seed: Optional[int] = 0  # shuffles the samples across shards; None keeps the sorted order


@dataclass(frozen=True)
class _Task:
    root: Path
    path: Path
    items: tuple[SourceItem, ...]
    mask_table: Optional[str]
    digest: str


def write_listing(listing: Listing, out_dir: str | os.PathLike, options: WriteOptions) -> dict[str, Any]:
    """Write ``listing`` into ``out_dir``; returns the manifest."""
    if options.samples_per_shard <= 0 or (options.shard_bytes is not None and options.shard_bytes <= 0):
        raise UserError("--samples-per-shard and --shard-bytes must be positive")
    duplicates = [key for key, n in Counter(item.key for item in listing.items).items() if n > 1]
    if duplicates:
        raise UserError(f"{len(duplicates)} sample key(s) occur twice, e.g. {duplicates[0]!r}; rename those source files")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{options.split}-*.tmp-*"):  # left by an interrupted run
        stale.unlink()
    shards = plan_shards(listing.items, options)
    tasks = [_Task(listing.root, out_dir / shard_name(options.split, index), tuple(items), listing.mask_table,
                   _digest(listing, items)) for index, items in enumerate(shards)]
    planned = {task.path.name for task in tasks}
    remove_other_shards(out_dir, options.split, planned)
    for record in out_dir.glob(f".{options.split}-*.tar.json"):
        if record.name[1:-len(".json")] not in planned:
            record.unlink()
    done = _completed(out_dir, options.split, tasks)
    todo = [task for task in tasks if task.path.name not in done]
    if done:
        log.info("%d of %d shards are already complete; writing the other %d", len(done), len(tasks), len(todo))
    for entry in _run(todo, options.processes):
        done[entry["name"]] = entry
        log.info("wrote %s (%d samples, %.1f MB) [%d/%d]", entry["name"], entry["samples"], entry["bytes"] / 1e6,
                 len(done), len(tasks))
    manifest = {
        "split": options.split,
        "format": listing.format,
        "samples": sum(len(task.items) for task in tasks),
        "classes": listing.classes,
        "seg_classes": listing.seg_classes,
        "ignore_index": IGNORE if listing.seg_classes else None,
        "left_out": listing.left_out,
        "writer": {"layout": LAYOUT_VERSION, **{k: v for k, v in asdict(options).items() if k not in ("split", "processes")}},
        "shards": [done[task.path.name] for task in tasks],
    }
    write_manifest(out_dir, options.split, manifest)
    for task in tasks:
        _record_path(task.path).unlink(missing_ok=True)
    return manifest


def plan_shards(items: list[SourceItem], options: WriteOptions) -> list[list[SourceItem]]:
    ordered = sorted(items, key=lambda item: item.key)
    if options.seed is not None:
        random.Random(options.seed).shuffle(ordered)
    shards: list[list[SourceItem]] = [[]]
    size = 0
    for item in ordered:
        full = len(shards[-1]) == options.samples_per_shard
        too_big = options.shard_bytes is not None and shards[-1] and size + item.bytes > options.shard_bytes
        if full or too_big:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.bytes
    return shards


def _run(tasks: list[_Task], processes: int) -> Iterator[dict[str, Any]]:
    if processes <= 1 or len(tasks) <= 1:
        yield from map(_write_shard, tasks)
        return
    with ProcessPoolExecutor(max_workers=processes) as pool:
        yield from pool.map(_write_shard, tasks)


def _write_shard(task: _Task) -> dict[str, Any]:
    entry = {**write_tar(task.path, (_sample(task, item) for item in task.items)), "source_digest": task.digest}
    record = _record_path(task.path)
    write_text_atomic(record, json.dumps(entry))
    return entry


def _sample(task: _Task, item: SourceItem) -> dict[str, Any]:
    try:
        sample: dict[str, Any] = {"__key__": item.key, item.image_type: item.image.read(task.root)}
        if item.label is not None:
            sample["cls"] = str(item.label).encode()
        if item.mask is not None:
            mask = item.mask.read(task.root)
            sample["seg.png"] = remap_mask(mask, task.mask_table) if task.mask_table else mask
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the source of sample {item.key} ({item.image.path}): {err}; fix or remove it "
                        "and run the same command again (finished shards are kept)") from None
    return sample


def _completed(out_dir: Path, split: str, tasks: list[_Task]) -> dict[str, dict[str, Any]]:
    """Manifest entries of the shards already on disk that hold what the plan puts there."""
    manifest = read_manifest(str(out_dir / manifest_name(split)), Reader())
    known = {entry["name"]: entry for entry in (manifest or {}).get("shards", [])}
    done = {}
    for task in tasks:
        record = _record_path(task.path)
        entry = json.loads(record.read_text()) if record.is_file() else known.get(task.path.name)
        if entry and entry.get("source_digest") == task.digest and task.path.is_file() \
                and task.path.stat().st_size == entry["bytes"]:
            done[task.path.name] = entry
    return done


def _record_path(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.json")


def _digest(listing: Listing, items: list[SourceItem]) -> str:
    content = [LAYOUT_VERSION, listing.format, listing.mask_table, [asdict(item) for item in items]]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
