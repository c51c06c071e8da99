"""Write samples into webdataset tar shards; expand and check shard lists."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Union

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from adala.errors import UserError

Sample = Mapping[str, Union[str, int, bytes, np.ndarray]]


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, *, prefix: str, per_shard: int) -> list[Path]:
    """Write ``samples`` (dicts with ``__key__`` and encoded fields) as ``prefix-000000.tar``, ... in ``out_dir``.

    The shards are written into a temporary directory and moved into ``out_dir`` only once all are complete.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{prefix}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with wds.ShardWriter(str(tmp / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for sample in samples:
                sink.write(dict(sample))
        written = sorted(tmp.glob(f"{prefix}-*.tar"))
        final = []
        for path in written:
            target = out_dir / path.name
            os.replace(path, target)
            final.append(target)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard list from a brace pattern (``/data/train-{000000..000099}.tar``), a list of them, or ``::``-joined
    patterns. Local files must exist; ``http(s)://`` URLs and ``pipe:`` commands are taken as given."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for pattern in patterns for part in pattern.split("::") for url in braceexpand(part)]
    if not urls:
        raise UserError("the shard list is empty; set the data URLs to tar shards, e.g. /data/train-{000000..000099}.tar")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]}{more} not found; check the data URLs (brace patterns expand to one file each)")
    return urls


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url) or url.startswith("file://")
