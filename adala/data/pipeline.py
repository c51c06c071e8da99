"""The data side of a run: up-front checks and the train/eval streams a stage reads, per rank.

Stages declare ``STREAM``: ``resampled`` (Stages 1-2, unlabeled images, an endless stream of shards drawn
with replacement) or ``epoch`` (Stage 3, labelled data epoch by epoch, every rank the same number of batches
per epoch). How slots, positions and the fallback on a changed layout work: ``adala.data.slots`` and
``adala.data.stream``.
"""
from __future__ import annotations

import logging
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


def check_data(data: Any, *, mode: str, world_size: int) -> None:
    """Everything about ``data`` a user can get wrong, checked before any model is built. A shard list that
    differs from its manifest is only warned about: leaving shards out can be deliberate."""
    if mode not in MODES:
        raise ValueError(f"unknown stream mode {mode!r}")
    if data.train is None:
        raise UserError("data.train is not set; point it at tar shards, e.g. data.train='/data/train-{000000..000099}.tar'")
    for key in ("workers", "shuffle_buffer", "http_retries"):
        if getattr(data, key) < 0:
            raise UserError(f"data.{key} must be 0 or more, got {getattr(data, key)}")
    if data.http_timeout <= 0:
        raise UserError(f"data.http_timeout must be positive (seconds), got {data.http_timeout}")
    urls = expand_urls(data.train)
    samples = _checked_samples("data.train", urls, data)
    if mode == "epoch":
        readers = world_size * max(1, data.workers)
        if len(urls) < readers:
            raise UserError(
                f"data.train has {len(urls)} shard(s), fewer than the {readers} readers ({world_size} rank(s) x "
                f"{max(1, data.workers)}) of an epoch-mode stage; write smaller shards "
                "(python -m adala.data write ... --samples-per-shard N) or lower data.workers")
        if samples is None and data.train_samples is None:
            raise UserError("this stage reads data.train epoch by epoch and needs its sample count: write the shards "
                            "with `python -m adala.data write` (its manifest has the counts) or set data.train_samples")
    if data.val is not None:
        _checked_samples("data.val", expand_urls(data.val), data)


def train_stream(
    data: Any, *, fields: Sequence[str], mode: str, transform: Transform, batch_size: int, seed: int, rank: int,
    world_size: int,
) -> TrainStream:
    """This rank's training batches (``batch_size`` each), without end, resumable through
    ``state_dict``/``load_state_dict``, with skip counts in ``counters()``."""
    urls = expand_urls(data.train)
    per_rank = max(1, data.workers)
    batches_per_epoch = None
    if mode == "epoch":
        samples = check_shard_list(urls, _reader(data)).samples or data.train_samples
        batches_per_epoch = samples // (world_size * per_rank * batch_size)
        if batches_per_epoch == 0:
            raise UserError(f"data.train has {samples} samples, less than one batch for each of the {world_size * per_rank} "
                            "readers; lower stage.batch_size or data.workers")
    slots = Slots(tuple(urls), Decoder(tuple(fields), transform), _reader(data), batch_size, rank=rank,
                  world_size=world_size, workers=per_rank, seed=seed, shuffle_buffer=data.shuffle_buffer,
                  batches_per_epoch=batches_per_epoch)
    return TrainStream(slots, workers=data.workers, mode=mode)


def eval_stream(
    data: Any, *, fields: Sequence[str], transform: Transform, batch_size: int, rank: int, world_size: int
) -> EvalStream:
    """This rank's evaluation batches: over all ranks, every sample of ``data.val`` exactly once. Ranks may get
    different numbers of batches; each rank's last batch may be partial."""
    slots = Slots(tuple(expand_urls(data.val)), Decoder(tuple(fields), transform), _reader(data), batch_size, rank=rank,
                  world_size=world_size, workers=max(1, data.workers))
    return EvalStream(slots, workers=data.workers)


def _reader(data: Any) -> Reader:
    return Reader(timeout=float(data.http_timeout), retries=int(data.http_retries))


def _checked_samples(key: str, urls: list[str], data: Any) -> Optional[int]:
    checked = check_shard_list(urls, _reader(data))
    for difference in checked.differences:
        log.warning("%s does not match its manifest: %s", key, difference)
    return checked.samples
