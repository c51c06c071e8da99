"""One manager for every stateful piece of a run, writing ``checkpoints/step-N/`` directories.

A checkpoint holds the model and optimizer in the strategy's format (``model/``: DCP shards, or DeepSpeed's
files), and one small file per rank (``ranks/rank-R.pt``) with the LR schedule, counters, RNG and data-stream
state. It is written under a temporary name by all ranks; the main rank then writes ``COMPLETE``, a manifest
of every file and its size, and renames the directory into place. Resume reads only directories whose
manifest matches their files, so a kill mid-save, a missing marker or a lost shard leave the previous
checkpoint as the one to resume from.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from adala.engine import distributed
from adala.errors import UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
MODEL_DIR = "model"
RANKS_DIR = "ranks"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class CheckpointManager:
    """Saves and restores ``model`` + ``optimizer`` through ``strategy`` and the per-rank ``states``.

    ``meta`` (e.g. the stage's name) is recorded in the manifest and must match on resume.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        strategy: Any,
        model: Any,
        optimizer: Any,
        states: dict[str, Stateful],
        meta: Optional[dict[str, Any]] = None,
        keep_last: int = 2,
    ) -> None:
        if keep_last < 1:
            raise UserError("train.keep_last must be at least 1")
        self.directory = Path(directory)
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.states = states
        self.meta = meta or {}
        self.keep_last = keep_last

    def save(self, step: int) -> Path:
        """Write ``step-N`` (a collective: every rank calls it at the same step)."""
        final = self.directory / f"step-{step}"
        tmp = self.directory / f".step-{step}.tmp"
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANKS_DIR).mkdir(parents=True)
        distributed.barrier()
        self.strategy.save_state(tmp / MODEL_DIR, self.model, self.optimizer)
        rank_file = tmp / RANKS_DIR / f"rank-{self.strategy.rank}.pt"
        torch.save({name: state.state_dict() for name, state in self.states.items()}, rank_file)
        distributed.barrier()
        if self.strategy.is_main:
            manifest = {
                "step": step,
                "world_size": self.strategy.world_size,
                "format": self.strategy.checkpoint_format,
                **self.meta,
                "files": _file_sizes(tmp),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
            if final.exists():  # an earlier run reached this step and was resumed from before it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(step)
        distributed.barrier()
        return final

    def load(self, path: str | os.PathLike) -> int:
        """Restore every piece from checkpoint ``path``; returns its step."""
        path = Path(path)
        manifest = check_resumable(path, strategy=self.strategy.name, checkpoint_format=self.strategy.checkpoint_format,
                                   meta=self.meta)
        saved_world = int(manifest["world_size"])
        self.strategy.load_state(path / MODEL_DIR, self.model, self.optimizer, saved_world)
        rank_file = path / RANKS_DIR / f"rank-{self.strategy.rank}.pt"
        if saved_world != self.strategy.world_size:
            log.warning("checkpoint %s was written by %d ranks and this run has %d: every rank restores rank 0's "
                        "counters, RNG and data-stream state (the stream re-splits its position deterministically)",
                        path, saved_world, self.strategy.world_size)
            rank_file = path / RANKS_DIR / "rank-0.pt"
        saved = torch.load(rank_file, map_location="cpu", weights_only=False)
        for name, state in self.states.items():
            if name in saved:
                state.load_state_dict(saved[name])
            else:  # e.g. evaluation switched on for the continued run
                log.warning("checkpoint %s holds no %r state; it starts afresh", path, name)
        return int(manifest["step"])

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.directory)

    def resume_point(self, resume: Optional[str]) -> Optional[Path]:
        return resume_point(self.directory, resume)

    def _prune(self, step: int) -> None:
        """Keep the last ``keep_last`` complete checkpoints up to ``step``. Any past ``step`` are left from a run
        this one was resumed from an earlier point of: they would shadow this run for ``resume=auto``, so go."""
        stale = [p for p in _step_dirs(self.directory) if step_of(p) > step]
        complete = [p for p in _step_dirs(self.directory) if step_of(p) <= step and read_manifest(p) is not None]
        for path in stale + complete[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``directory``; incomplete ones are reported and skipped. Raises when
    checkpoints exist but none of them is usable."""
    candidates = list(reversed(_step_dirs(directory)))
    for path in candidates:
        if read_manifest(path) is not None:
            return path
        log.warning("skipping incomplete checkpoint %s (no %s manifest, or files missing or truncated)", path, COMPLETE_MARKER)
    if candidates:
        raise UserError(f"no usable checkpoint in {directory} ({len(candidates)} incomplete); "
                        "remove them, or start over with resume=none and a new run_dir")
    return None


def _step_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def check_resumable(path: Path, *, strategy: str, checkpoint_format: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` if this run can resume from it; otherwise one clear error."""
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"{path} is not a complete checkpoint (its {COMPLETE_MARKER} manifest is missing or its "
                        "files do not match it); use resume=auto to pick the latest complete one")
    if manifest["format"] != checkpoint_format:
        raise UserError(f"{path} was written in the {manifest['format']} format and strategy={strategy} "
                        f"reads {checkpoint_format}; resume with the strategy that wrote it")
    for key, value in meta.items():
        if manifest.get(key) != value:
            raise UserError(f"{path} belongs to {key} {manifest.get(key)!r}, not {value!r}; use another run_dir")
    return manifest


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's manifest if the directory is complete: the marker parses and every file it lists is
    there with its recorded size; None otherwise."""
    try:
        manifest = json.loads((path / COMPLETE_MARKER).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return manifest


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step-N checkpoint directory")
    return int(match.group(1))


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def resume_point(directory: Path, resume: Optional[str]) -> Optional[Path]:
    """Where ``resume`` (none | auto | a checkpoint directory) says to continue from; None: start fresh."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(directory)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume}: no such checkpoint directory; use resume=auto or a checkpoints/step-N path")
    return path
