"""Guard rails for the directories a run writes: one writer at a time, and no fresh run over an earlier run.

Locks are ``flock`` locks on a file (``<run_dir>/.lock``, or a cache entry's lock file). The kernel drops them
when their holder ends, however it ends (``kill -9`` included), so a lock is never left stuck; the file itself
stays, and holds the latest holder's pid and host for the message of the next one. On NFS, Linux maps ``flock``
to POSIX locks, so a lock on shared storage holds across nodes (Lustre needs its ``flock`` mount option).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from adala.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What a run writes besides config.yaml: a fresh run refuses a directory holding any of them.
RESULTS = ("checkpoints", "export", "log.jsonl", "tb", "metrics.json")
_ACQUIRE_PATIENCE_S = 2.0  # rides over another process's momentary probe (see holder)


class FileLock:
    """An exclusive lock on ``path`` (created when taken), held until :meth:`release` or the end of the process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def try_acquire(self, patience_s: float = _ACQUIRE_PATIENCE_S) -> Optional[str]:
        """Take the lock; None when taken, else who holds it (after retrying for ``patience_s`` seconds)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return _describe(self.path)
                time.sleep(0.05)
        self._claim(fd)
        return None

    def wait(self, what: str) -> None:
        """Take the lock, waiting for its holder to finish (``what`` names the guarded thing in the log)."""
        held_by = self.try_acquire(patience_s=0.0)
        if held_by is None:
            return
        log.info("waiting for %s (%s)", what, held_by)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._claim(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def _claim(self, fd: int) -> None:
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())


def holder(path: Path) -> Optional[str]:
    """Who holds the lock at ``path`` (None when nobody does); takes and drops it at once, creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    finally:
        os.close(fd)  # also drops the shared lock if it was taken
    return None


def _describe(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "held by another process"


@contextlib.contextmanager
def cache_entry_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` while a cache entry is created: a second creator waits, then finds it made."""
    lock = FileLock(path)
    lock.wait(what)
    try:
        yield
    finally:
        lock.release()


def lock_run_dir(run_dir: Path, *, is_main: bool) -> FileLock:
    """The main rank takes ``run_dir``'s lock for the run; every rank raises if it could not (a collective)."""
    from adala.engine import distributed

    lock = FileLock(Path(run_dir) / LOCK_NAME)
    held_by = distributed.broadcast_object(lock.try_acquire() if is_main else None)
    if held_by is not None:
        raise UserError(in_use(run_dir, held_by))
    return lock


def in_use(run_dir: Path, held_by: str) -> str:
    return f"run_dir {run_dir} is in use by another run ({held_by}); wait for it to end or choose another run_dir"


def check_run_dir(run_dir: Path, *, resume: str, overwrite: bool) -> None:
    """Refuse a run that would clash with another: a directory another process is writing to, and a fresh run
    (``resume=none``) into a directory holding an earlier run's results unless ``overwrite`` is set."""
    run_dir = Path(run_dir)
    fresh = resume in ("", "none")
    if overwrite and not fresh:
        raise UserError(f"overwrite=true starts run_dir {run_dir} over, resume={resume} continues it; choose one")
    held_by = holder(run_dir / LOCK_NAME)
    if held_by is not None:
        raise UserError(in_use(run_dir, held_by))
    found = previous_results(run_dir)
    if fresh and found and not overwrite:
        raise UserError(f"run_dir {run_dir} holds an earlier run ({', '.join(found)}); continue it with resume=auto, "
                        "or start over with overwrite=true (removes them)")


def previous_results(run_dir: Path) -> list[str]:
    """The entries of :data:`RESULTS` that ``run_dir`` holds (empty directories do not count)."""
    found = []
    for name in RESULTS:
        path = Path(run_dir) / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove an earlier run's results from ``run_dir`` (``overwrite=true``); returns what was removed."""
    found = []
    for name in RESULTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        found.append(name)
    return found
