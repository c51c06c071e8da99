"""Where a run's numbers go: a progress bar, TensorBoard scalars and ``log.jsonl`` (one line per logged step)."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Mapping

from tqdm import tqdm

from adala.files import write_text_atomic


class MetricLogger:
    """Logs on the main rank (``enabled``); ``progress``: draw a progress bar (decided by the caller, see
    :func:`adala.logs.show_progress`)."""

    def __init__(
        self, run_dir: Path, *, total_steps: int, start: tuple[int, int], enabled: bool, progress: bool
    ) -> None:
        start_step, start_images = start
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step)
        self.jsonl = _log_file(run_dir / "log.jsonl", start_step)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=False)
        self._last = (time.perf_counter(), start_images)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, exports) does not count against the training throughput."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.enabled:
                last_time, last_images = self._last
                self._last = (last_time + time.perf_counter() - started, last_images)

    def step(self, step: int, images: int, scalars: Mapping[str, float], *, write: bool) -> None:
        """Called after every step; ``write`` says whether this one goes to TensorBoard and the log file."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in scalars:
                self.bar.set_postfix(loss=f"{scalars['loss']:.4g}")
        if not write:
            return
        now = time.perf_counter()
        last_time, last_images = self._last
        record = dict(scalars)
        if images > last_images and now > last_time:
            record["images_per_s"] = (images - last_images) / (now - last_time)
        self._last = (now, images)
        for key, value in record.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _log_file(path: Path, start_step: int):
    """Open the run's log for appending, first dropping lines past ``start_step``: a resumed run repeats the
    steps after its checkpoint, and each step should appear once."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= start_step]
        write_text_atomic(path, "".join(kept))
    return open(path, "a", buffering=1)
