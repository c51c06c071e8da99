"""The log format of every adala process (stage runs, launchers, batch scripts).

Every line names the rank it comes from; ranks above 0 log warnings and errors only, so a job of many ranks
logs its progress once. Progress bars are drawn on rank 0 and only on a terminal: in a batch log (SLURM's
``.out`` file) their carriage returns would fill the file.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


def process_rank() -> int:
    """This process's rank: the process group's once it is up, before that the launcher's ``RANK`` (torchrun,
    SLURM through torchrun, Ray Train); 0 in a process nobody launched as a rank."""
    dist = sys.modules.get("torch.distributed")  # never imported here: launchers log without torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class RankFilter(logging.Filter):
    """Stamps each record with its rank and drops records below WARNING on ranks above 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = process_rank()
        return record.rank == 0 or record.levelno >= logging.WARNING


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def show_progress(requested: bool) -> bool:
    """Whether this process draws progress bars: if ``requested`` (``train.progress``), on rank 0, on a terminal."""
    return requested and process_rank() == 0 and sys.stderr.isatty()
