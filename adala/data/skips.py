"""What the data pipeline left out, by reason: counted, logged, never raised.

``skipped_corrupt`` and ``skipped_missing_field`` count samples (an image or mask that does not decode; a
sample without a field the stage reads); ``skipped_unreachable`` and ``skipped_truncated`` count shards (one
that could not be opened; one that broke off mid-way, its remaining samples lost). The engine sums them over
ranks and logs them as ``data/<name>``.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

log = logging.getLogger("adala.data")

REASONS = ("skipped_corrupt", "skipped_missing_field", "skipped_unreachable", "skipped_truncated")


class Skips:
    """Cumulative counts per reason. While ``muted`` (replaying a stream up to its resume point) nothing is
    counted or logged: those skips were counted by the run that saved the state."""

    def __init__(self, counts: Optional[Mapping[str, int]] = None) -> None:
        self.counts = {reason: 0 for reason in REASONS}
        self.counts.update({reason: int(n) for reason, n in (counts or {}).items() if reason in self.counts})
        self.muted = False

    def record(self, reason: str, what: str, err: BaseException | str) -> None:
        if self.muted:
            return
        self.counts[reason] += 1
        log.warning("%s: %s (%s)", reason.replace("_", " "), what, err)


def total(*counts: Mapping[str, int]) -> dict[str, int]:
    """Counts summed reason by reason."""
    return {reason: sum(int(c.get(reason, 0)) for c in counts) for reason in REASONS}
