"""A rank's training and evaluation streams: its slots read in process or by DataLoader workers.

With ``workers`` > 0 each DataLoader worker is one slot (see ``adala.data.slots``). The DataLoader takes
batches from its workers strictly round-robin, so the order of batches is fixed; every batch carries its
slot's resume position and skip counts, and the stream keeps those of the last batch it handed out. The state
is therefore exactly what the training loop consumed, whatever the workers prefetched.

State (``TrainStream.state_dict()``), plain Python values::

    version, mode, seed, shards (digest of the shard list), batch_size, batches_per_epoch,
    rank, world_size, workers                       -- the layout the positions belong to
    next_worker                                     -- the slot whose batch comes next
    slots: [{epoch, taken, batches, counters}, ...] -- one per slot of this rank
    carried: {reason: n}                            -- counts inherited through a fallback

Resume: with the same layout every slot continues at its position, the fresh DataLoader's worker 0 playing
slot ``next_worker``: the remaining batches are exactly those of an uninterrupted run. With a different
layout (world size, workers, shard list, seed, batch size or mode) positions cannot carry over, and the
fallback is: every slot starts epoch (the largest epoch in the saved state) + 1 with the new layout; rank 0
keeps the saved skip counts, other ranks start from zero. It is announced with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from adala.data.shards import fingerprint
from adala.data.skips import Skips, total
from adala.data.slots import Batch, Position, Slots

log = logging.getLogger("adala.data")

STATE_VERSION = 1


@dataclass
class Report:
    """What a slot sends along with each batch."""

    worker: int
    position: Position
    counts: dict[str, int]


class TrainStream:
    """This rank's training batches, without end; resumable through ``state_dict``/``load_state_dict``."""

    def __init__(self, slots: Slots, *, workers: int, mode: str) -> None:
        self.slots = slots
        self.workers = workers  # DataLoader worker processes; 0: read in this process (one slot)
        self.mode = mode
        self.positions = [Position() for _ in range(slots.workers)]
        self.slot_counts = [Skips().counts for _ in range(slots.workers)]
        self.carried = Skips().counts
        self.next_worker = 0

    def counters(self) -> dict[str, int]:
        """Cumulative skip counts of this rank (restored on resume)."""
        return total(self.carried, *self.slot_counts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "next_worker": self.next_worker,
            "slots": [{**asdict(p), "counters": dict(c)} for p, c in zip(self.positions, self.slot_counts)],
            "carried": dict(self.carried),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = {key: state.get(key) for key in self._layout()}
        changed = [f"{key} {saved[key]} -> {now}" for key, now in self._layout().items() if saved[key] != now]
        if state.get("version") == STATE_VERSION and not changed:
            self.positions = [Position(s["epoch"], s["taken"], s["batches"]) for s in state["slots"]]
            self.slot_counts = [Skips(s["counters"]).counts for s in state["slots"]]
            self.carried = Skips(state["carried"]).counts
            self.next_worker = int(state["next_worker"])
            return
        epoch = max((int(s["epoch"]) for s in state.get("slots", [])), default=-1) + 1
        self.positions = [Position(epoch) for _ in range(self.slots.workers)]
        self.slot_counts = [Skips().counts for _ in range(self.slots.workers)]
        saved_counts = total(state.get("carried", {}), *(s.get("counters", {}) for s in state.get("slots", [])))
        self.carried = saved_counts if self.slots.rank == 0 else Skips().counts
        self.next_worker = 0
        log.warning("the data stream's saved state does not fit this run (%s); exact resume is not possible, so "
                    "every reader starts at the beginning of epoch %d", ", ".join(changed) or "other version", epoch)

    def __iter__(self) -> Iterator[Batch]:
        dataset = _TrainSlots(self.slots, list(self.positions), [dict(c) for c in self.slot_counts], self.next_worker)
        for batch, report in _read(dataset, self.workers):
            self.positions[report.worker] = report.position
            self.slot_counts[report.worker] = report.counts
            self.next_worker = (report.worker + 1) % self.slots.workers
            yield batch

    def _layout(self) -> dict[str, Any]:
        s = self.slots
        return {"mode": self.mode, "seed": s.seed, "shards": fingerprint(s.urls), "batch_size": s.batch_size,
                "batches_per_epoch": s.batches_per_epoch, "rank": s.rank, "world_size": s.world_size,
                "workers": self.workers}


class EvalStream:
    """This rank's evaluation batches, one pass; over all ranks every sample exactly once."""

    def __init__(self, slots: Slots, *, workers: int) -> None:
        self.slots = slots
        self.workers = workers
        self.slot_counts = [Skips().counts for _ in range(slots.workers)]

    def counters(self) -> dict[str, int]:
        return total(*self.slot_counts)

    def __iter__(self) -> Iterator[Batch]:
        for batch, report in _read(_EvalSlots(self.slots), self.workers):
            self.slot_counts[report.worker] = report.counts
            if batch is not None:
                yield batch


class _TrainSlots(IterableDataset):
    def __init__(self, slots: Slots, positions: list[Position], counts: list[dict[str, int]], rotation: int) -> None:
        self.slots, self.positions, self.counts, self.rotation = slots, positions, counts, rotation

    def __iter__(self) -> Iterator[tuple[Batch, Report]]:
        worker = (_physical_worker() + self.rotation) % self.slots.workers
        skips = Skips(self.counts[worker])
        for batch, position in self.slots.train_batches(worker, self.positions[worker], skips):
            yield batch, Report(worker, position, dict(skips.counts))


class _EvalSlots(IterableDataset):
    def __init__(self, slots: Slots) -> None:
        self.slots = slots

    def __iter__(self) -> Iterator[tuple[Optional[Batch], Report]]:
        worker = _physical_worker()
        skips = Skips()
        for batch in self.slots.eval_batches(worker, skips):
            yield batch, Report(worker, Position(), dict(skips.counts))
        yield None, Report(worker, Position(), dict(skips.counts))  # skips after the last batch


def _physical_worker() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _read(dataset: IterableDataset, workers: int) -> Iterator[tuple[Batch, Report]]:
    if workers == 0:
        return iter(dataset)
    # The slots seed their own randomness. A generator of the loader's own keeps it from drawing its workers' seed
    # from the global torch RNG, which dropout goes on drawing from: else a resume (a new loader) would shift it.
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    return iter(loader)


def _as_is(item: Any) -> Any:
    """Batches are assembled in the slots; the DataLoader only moves them."""
    return item
