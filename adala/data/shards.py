"""Shard lists: brace patterns expanded and checked, and the naming rule that ties a shard to its split."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Optional, Sequence

from braceexpand import braceexpand

from adala.errors import UserError

SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d+)\.tar$")  # <split>-000123.tar, as the writer names them


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern (``/data/train-{000000..000099}.tar``), a list of them, or ``::``-joined
    patterns. Local files must exist; ``http(s)://`` URLs and ``pipe:`` commands are taken as given."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for pattern in patterns for part in pattern.split("::") if part for url in braceexpand(part)]
    if not urls:
        raise UserError("the shard list is empty; set the data URLs to tar shards, e.g. /data/train-{000000..000099}.tar")
    missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]}{more} not found; check the data URLs (brace patterns expand to one file each)")
    return urls


def is_local(url: str) -> bool:
    return url.startswith("file://") or not (url.startswith("pipe:") or "://" in url)


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def split_of(url: str) -> Optional[tuple[str, str, str]]:
    """(folder URL, split, file name) of a shard named ``<split>-<digits>.tar``; None for ``pipe:`` commands and
    other names."""
    if url.startswith("pipe:"):
        return None
    folder, _, name = url.rpartition("/")
    match = SHARD_NAME.match(name)
    return (folder or ".", match["split"], name) if match else None


def fingerprint(urls: Sequence[str]) -> str:
    """A short digest of a shard list, stored with a stream's state to notice a changed list on resume."""
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
