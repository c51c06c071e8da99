"""One manager for every stateful piece of a run, writing ``checkpoints/step-N/`` directories.

A checkpoint is written under a temporary name, completed by a marker file written last, then renamed into
place; resume only ever reads directories that carry the marker, so a crash or a kill mid-save leaves the
previous checkpoint as the latest usable one.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, states: dict[str, Stateful], keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.directory = Path(directory)
        self.states = states
        self.keep_last = keep_last

    def save(self, step: int) -> Path:
        final = self.directory / f"step-{step}"
        tmp = self.directory / f".step-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({name: state.state_dict() for name, state in self.states.items()}, tmp / STATE_FILE)
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        if final.exists():  # an earlier run reached this step and was resumed from before it
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def load(self, path: str | os.PathLike) -> int:
        """Restore every registered state from checkpoint ``path``; returns its step."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        missing = set(self.states) - set(saved)
        if missing:
            raise ValueError(f"checkpoint {path} lacks {sorted(missing)}; it was written by another stage")
        for name, state in self.states.items():
            state.load_state_dict(saved[name])
        return step_of(path)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint; incomplete ones are reported and skipped."""
        for path in reversed(self._step_dirs()):
            if is_complete(path):
                return path
            log.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE_MARKER)
        return None

    def _step_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(dirs, key=step_of)

    def _prune(self) -> None:
        complete = [p for p in self._step_dirs() if is_complete(p)]
        for path in complete[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step-N checkpoint directory")
    return int(match.group(1))
