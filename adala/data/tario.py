"""Tar shards written deterministically and atomically: fixed member metadata (mtime 0, no owner names, mode
644, members of a sample in sorted order), so the same samples give the same bytes; written under a temporary
name and renamed when complete, so a shard's final name always means a complete shard."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Optional

import numpy as np

from adala.files import temporary

TAR_METADATA = dict(user="", group="", mode=0o644, mtime=0)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_tar(path: Path, samples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Write ``samples`` (``__key__`` plus member bytes by extension) to ``path``; returns the manifest entry:
    name, samples, bytes, sha256."""
    import webdataset as wds

    tmp = temporary(path)
    count = 0
    try:
        with open(tmp, "wb") as file:
            sink = _Hashing(file)
            with wds.TarWriter(sink, encoder=False, **TAR_METADATA) as tar:
                for sample in samples:
                    tar.write(dict(sample))
                    count += 1
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": path.name, "samples": count, "bytes": sink.size, "sha256": sink.digest.hexdigest()}


def write_samples(
    samples: Iterable[Mapping[str, Any]], out_dir: Path, *, split: str, per_shard: int, extra: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """Write in-memory samples as ``<split>-000000.tar``, ... plus ``<split>.manifest.json`` (with ``extra``
    fields); shards of the split left from an earlier, larger write are removed. Returns the manifest."""
    from adala.data.manifest import write_manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, chunk = [], []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == per_shard:
            entries.append(write_tar(out_dir / shard_name(split, len(entries)), chunk))
            chunk = []
    if chunk or not entries:
        entries.append(write_tar(out_dir / shard_name(split, len(entries)), chunk))
    remove_other_shards(out_dir, split, {e["name"] for e in entries})
    manifest = {"split": split, **(extra or {}), "samples": sum(e["samples"] for e in entries), "shards": entries}
    write_manifest(out_dir, split, manifest)
    return manifest


def remove_other_shards(out_dir: Path, split: str, keep: set[str]) -> None:
    from adala.data.shards import SHARD_NAME

    for path in out_dir.glob(f"{split}-*.tar"):
        match = SHARD_NAME.match(path.name)
        if match and match["split"] == split and path.name not in keep:
            path.unlink()


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class _Hashing:
    """A write-only file that hashes and counts what passes through, so a shard is not read back to checksum it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)
