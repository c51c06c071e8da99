"""The data side of a run: its data plan (checked and resolved once) and the train/eval streams a stage reads, per rank.

Validation turns ``cfg.data`` into a :class:`DataPlan` with :func:`check_data`: the shard lists expanded, their
manifests read and the sample count of one pass settled, once; the streams read from that plan.

Stages declare ``STREAM``: ``resampled`` (Stages 1-2, unlabeled images, an endless stream of shards drawn
with replacement) or ``epoch`` (Stage 3, labelled data epoch by epoch, every rank the same number of batches
per epoch). How slots, positions and the fallback on a changed layout work: ``adala.data.slots`` and
``adala.data.stream``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from adala.data.decode import Decoder
from adala.data.manifest import check_shard_list
from adala.data.opener import Reader
from adala.data.shards import expand_urls
from adala.data.slots import MODES, Slots
from adala.data.stream import EvalStream, TrainStream
from adala.data.transforms import Transform
from adala.errors import UserError

log = logging.getLogger("adala.data")


@dataclass(frozen=True)
class DataPlan:
    """A run's data, resolved once: the shard URLs of each split, the samples in one pass over the training
    split, and how shards are read."""

    train: tuple[str, ...]  # empty when data.train is not set
    val: tuple[str, ...]  # empty when data.val is not set
    train_samples: Optional[int]  # one pass over train: its manifest's count, else data.train_samples
    reader: Reader
    workers: int  # DataLoader workers per rank; 0: read in the training process
    shuffle_buffer: int


def resolve_data(data: Any) -> DataPlan:
    """Expand ``data.train`` and ``data.val`` and read their manifests. A shard list that differs from its
    manifest is only warned about: leaving shards out can be deliberate."""
    reader = Reader(timeout=float(data.http_timeout), retries=int(data.http_retries))
    train = tuple(expand_urls(data.train)) if data.train is not None else ()
    val = tuple(expand_urls(data.val)) if data.val is not None else ()
    counted = _manifest_samples("data.train", train, reader) if train else None
    if val:
        _manifest_samples("data.val", val, reader)
    return DataPlan(train=train, val=val, train_samples=counted if counted is not None else data.train_samples,
                    reader=reader, workers=data.workers, shuffle_buffer=data.shuffle_buffer)


def check_data(data: Any, *, mode: str, world_size: int, batch_size: int) -> DataPlan:
    """Everything about ``data`` a user can get wrong, checked before any model is built; returns the plan the
    streams read. ``batch_size`` is per rank."""
    if mode not in MODES:
        raise ValueError(f"unknown stream mode {mode!r}")
    if data.train is None:
        raise UserError("data.train is not set; point it at tar shards, e.g. data.train='/data/train-{000000..000099}.tar'")
    for key in ("workers", "shuffle_buffer", "http_retries"):
        if getattr(data, key) < 0:
            raise UserError(f"data.{key} must be 0 or more, got {getattr(data, key)}")
    if data.http_timeout <= 0:
        raise UserError(f"data.http_timeout must be positive (seconds), got {data.http_timeout}")
    if not 0 < data.cat_max_ratio <= 1:
        raise UserError(f"data.cat_max_ratio is the largest share of a crop one class may cover, in (0, 1] (1: any "
                        f"crop); got {data.cat_max_ratio}")
    plan = resolve_data(data)
    if mode == "epoch":
        readers = world_size * max(1, data.workers)
        if len(plan.train) < readers:
            raise UserError(
                f"data.train has {len(plan.train)} shard(s), fewer than the {readers} readers ({world_size} rank(s) x "
                f"{max(1, data.workers)}) of an epoch-mode stage; write smaller shards "
                "(python -m adala.data write ... --samples-per-shard N) or lower data.workers")
        if plan.train_samples is None:
            raise UserError("this stage reads data.train epoch by epoch and needs its sample count: write the shards "
                            "with `python -m adala.data write` (its manifest has the counts) or set data.train_samples")
        if plan.train_samples < readers * batch_size:
            raise UserError(f"data.train has {plan.train_samples} samples, less than one batch for each of the "
                            f"{readers} readers; lower stage.batch_size or data.workers")
    return plan


def train_stream(
    plan: DataPlan, *, fields: Sequence[str], mode: str, transform: Transform, batch_size: int, seed: int, rank: int,
    world_size: int,
) -> TrainStream:
    """This rank's training batches (``batch_size`` each), without end, resumable through
    ``state_dict``/``load_state_dict``, with skip counts in ``counters()``. Epoch mode needs
    ``plan.train_samples`` (:func:`check_data` makes sure of it)."""
    per_rank = max(1, plan.workers)
    batches_per_epoch = plan.train_samples // (world_size * per_rank * batch_size) if mode == "epoch" else None
    slots = Slots(plan.train, Decoder(tuple(fields), transform), plan.reader, batch_size, rank=rank,
                  world_size=world_size, workers=per_rank, seed=seed, shuffle_buffer=plan.shuffle_buffer,
                  batches_per_epoch=batches_per_epoch)
    return TrainStream(slots, workers=plan.workers, mode=mode)


def eval_stream(
    plan: DataPlan, *, fields: Sequence[str], transform: Transform, batch_size: int, rank: int, world_size: int
) -> EvalStream:
    """This rank's evaluation batches: over all ranks, every sample of ``plan.val`` exactly once. Ranks may get
    different numbers of batches; each rank's last batch may be partial."""
    slots = Slots(plan.val, Decoder(tuple(fields), transform), plan.reader, batch_size, rank=rank,
                  world_size=world_size, workers=max(1, plan.workers))
    return EvalStream(slots, workers=plan.workers)


def _manifest_samples(key: str, urls: Sequence[str], reader: Reader) -> Optional[int]:
    checked = check_shard_list(urls, reader)
    for difference in checked.differences:
        log.warning("%s does not match its manifest: %s", key, difference)
    return checked.samples
