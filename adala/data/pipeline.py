"""The data side of a run: up-front checks and the train/eval streams a stage reads, per rank."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from adala.data.shards import expand_urls
from adala.data.stream import ShardStream
from adala.data.transforms import Transform
from adala.errors import UserError

MODES = ("resampled", "epoch")


def check_data(data: Any, *, mode: str, world_size: int) -> None:
    """Everything about ``data`` a user can get wrong, checked before any model is built."""
    if mode not in MODES:
        raise ValueError(f"unknown stream mode {mode!r}")
    if data.train is None:
        raise UserError("data.train is not set; point it at tar shards, e.g. data.train='/data/train-{000000..000099}.tar'")
    expand_urls(data.train)
    if data.val is not None:
        expand_urls(data.val)


def train_stream(
    data: Any, *, fields: Sequence[str], mode: str, transform: Transform, batch_size: int, seed: int, rank: int,
    world_size: int,
) -> ShardStream:
    """This rank's training batches (``batch_size`` each), resumable through ``state_dict``/``load_state_dict``."""
    return ShardStream(expand_urls(data.train), fields=fields, transform=transform, batch_size=batch_size, seed=seed,
                       shuffle_buffer=data.shuffle_buffer)


def eval_stream(
    data: Any, *, fields: Sequence[str], transform: Transform, batch_size: int, rank: int, world_size: int
) -> Iterable[dict[str, torch.Tensor]]:
    """This rank's evaluation batches: over all ranks, every sample of ``data.val`` exactly once."""
    return ShardStream(expand_urls(data.val), fields=fields, transform=transform, batch_size=batch_size,
                       shuffle_buffer=0, repeat=False, drop_last=False)
