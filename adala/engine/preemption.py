"""Preemption: SIGTERM or SIGUSR2 asks the run to save at the next step boundary and exit with
:data:`REQUEUE_EXIT_CODE`, which launchers read as "requeue me". SIGUSR1 is left alone: NCCL uses it.

All ranks must stop at the same step, so the request is agreed by an all-reduce in the loop (a signal may
reach only some ranks, or reach them during different steps).
"""
from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any, Optional

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; run the same command again to continue


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is written."""

    def __init__(self, step: int, checkpoint: Any, signum: Optional[int] = None) -> None:
        super().__init__(f"preempted: saved {checkpoint} at step {step}; run the same command with resume=auto to continue")
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum  # the signal this process received; None when only another rank received one


class PreemptionFlag:
    """Set by a preemption signal while installed; the previous handlers come back on :meth:`uninstall`."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a Ray actor's worker thread): no handler
                log.debug("cannot install a handler for %s outside the main thread", sig)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self.requested:
            log.warning("received %s: saving at the next step boundary, then exiting for requeue", signal.Signals(signum).name)
            self.signum = signum
        self.requested = True
