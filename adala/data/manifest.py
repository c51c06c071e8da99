"""The manifest written next to a split's shards: ``<split>.manifest.json`` with sample counts, byte sizes and
checksums per shard, class names by index and how it was written.

Readers use it for the sample count of an epoch and to warn when a shard list differs from what was written.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from adala.data.opener import Reader
from adala.data.shards import is_local, local_path, split_of
from adala.files import write_text_atomic

log = logging.getLogger("adala.data")

SUFFIX = ".manifest.json"
SHOWN = 3  # names shown per kind of difference


def manifest_name(split: str) -> str:
    return f"{split}{SUFFIX}"


def write_manifest(out_dir: Path, split: str, manifest: dict[str, Any]) -> Path:
    """Write atomically (temporary name, then rename), so a reader never sees half a manifest."""
    path = Path(out_dir) / manifest_name(split)
    return write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")


def read_manifest(url: str, reader: Reader) -> Optional[dict[str, Any]]:
    """The manifest at ``url`` (a path or URL), or None if there is none or it cannot be read."""
    try:
        if is_local(url):
            path = local_path(url)
            return json.loads(Path(path).read_text()) if os.path.isfile(path) else None
        return json.loads(reader.fetch(url))
    except (OSError, ValueError) as err:
        log.debug("no manifest at %s: %s", url, err)
        return None


@dataclass
class ShardListCheck:
    """A shard list compared with the manifests of the splits it names."""

    samples: Optional[int]  # samples in the listed shards; None unless every shard is in a manifest
    differences: list[str] = field(default_factory=list)  # one line per manifest that the list does not match


def check_shard_list(urls: Sequence[str], reader: Reader) -> ShardListCheck:
    groups: dict[str, list[tuple[str, str]]] = {}
    for url in urls:
        where = split_of(url)
        if where is not None:
            folder, split, name = where
            groups.setdefault(f"{folder}/{manifest_name(split)}", []).append((url, name))
    total, covered, differences = 0, 0, []
    for manifest_url, listed in groups.items():
        manifest = read_manifest(manifest_url, reader)
        if manifest is None:
            continue
        entries = {entry["name"]: entry for entry in manifest["shards"]}
        names = {name for _, name in listed}
        unknown = sorted(names - entries.keys())
        unlisted = sorted(entries.keys() - names)
        resized = sorted(name for url, name in listed if name in entries and is_local(url)
                         and os.path.getsize(local_path(url)) != entries[name]["bytes"])
        total += sum(entries[name]["samples"] for name in names & entries.keys())
        covered += sum(1 for _, name in listed if name in entries)
        parts = [_describe(unknown, "listed shard(s) not in it"), _describe(unlisted, "of its shard(s) not listed"),
                 _describe(resized, "shard(s) whose size differs from it")]
        if any(parts):
            differences.append(f"{manifest_url}: " + "; ".join(p for p in parts if p))
    return ShardListCheck(samples=total if covered == len(urls) else None, differences=differences)


def _describe(names: list[str], what: str) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
    return f"{len(names)} {what} ({shown})"
