"""Files written so that a reader never sees half of one: a temporary name beside the target, then a rename."""
from __future__ import annotations

import os
from pathlib import Path


def temporary(path: Path) -> Path:
    """Where ``path`` is written before the rename; starts with a dot so shard patterns never match it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name and rename it into place."""
    path = Path(path)
    tmp = temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
