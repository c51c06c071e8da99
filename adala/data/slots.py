"""What one reader ("slot") of a shard list reads, batch by batch, resumable to the exact sample.

A slot is a rank's reader in the training process, or one of its DataLoader workers; slots are numbered over
all ranks, ``slot = rank × workers + worker``. Each slot's stream is a sequence of epochs:

- ``resampled`` (Stages 1-2, open_clip style): a slot's epoch is one shard drawn with replacement from the
  whole list by a generator seeded with (seed, epoch, rank, worker), its samples shuffled in a buffer. The
  stream never ends; partial batches carry over into the next draw.
- ``epoch`` (Stage 3): epoch e shuffles the shard list by (seed, e), the same on every rank, and deals it
  round-robin to the slots; a slot cycles through its shards (reading them again if they run short) through
  a shuffle buffer seeded by (seed, e, rank, worker) and stops after exactly ``batches_per_epoch`` batches, so
  every slot, and so every rank, yields the same number of batches per epoch.
- ``eval``: every sample exactly once over all slots: whole shards per slot when there are at least as many
  shards as slots, otherwise every slot reads all shards and keeps every (number of slots)-th sample.

A slot's position is (epoch, raw samples taken in that epoch, batches completed in it). Resuming replays the
epoch's shuffled stream and drops the taken samples before they are decoded, so at most one epoch of one
slot's shards is read again: one shard in resampled mode.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import default_collate

from adala.data.decode import Decoder
from adala.data.opener import Reader
from adala.data.skips import Skips
from adala.errors import UserError

MODES = ("resampled", "epoch")
MAX_EMPTY_DRAWS = 50  # resampled: shard draws in a row without a single sample before giving up
MAX_UNUSABLE = 1000  # samples in a row that cannot be used before giving up

Batch = dict[str, torch.Tensor]


@dataclass
class Position:
    epoch: int = 0  # resampled: the slot's n-th shard draw; epoch mode: the pass over the data
    taken: int = 0  # raw samples taken from this epoch's shuffled stream, before decoding
    batches: int = 0  # batches completed in this epoch


@dataclass(frozen=True)
class Slots:
    """Everything the slots of one rank need to read their share; plain data, so DataLoader workers get a copy."""

    urls: tuple[str, ...]
    decoder: Decoder
    reader: Reader
    batch_size: int
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # slots per rank
    seed: int = 0
    shuffle_buffer: int = 0
    batches_per_epoch: Optional[int] = None  # epoch mode; None: resampled

    def slot(self, worker: int) -> int:
        return self.rank * self.workers + worker

    @property
    def total(self) -> int:
        return self.world_size * self.workers

    def train_batches(self, worker: int, start: Position, skips: Skips) -> Iterator[tuple[Batch, Position]]:
        """This slot's batches from ``start`` on, each with the position to resume from after it."""
        position, pending, unusable, empty_draws = replace(start), [], 0, 0
        while True:
            raw = self._epoch_samples(worker, position.epoch, skips)
            skips.muted = True
            seen = sum(1 for _ in itertools.islice(raw, position.taken))
            skips.muted = False
            for sample in raw:
                position.taken += 1
                seen += 1
                decoded = self.decoder(sample, skips, sample_seed(self.seed, position.epoch, self.rank, worker, position.taken))
                unusable = 0 if decoded is not None else unusable + 1
                if unusable >= MAX_UNUSABLE:
                    raise UserError(f"{MAX_UNUSABLE} samples in a row could not be used (see the warnings above); check "
                                    f"that the shards hold this stage's fields ({', '.join(self.decoder.fields)})")
                if decoded is None:
                    continue
                pending.append(decoded)
                if len(pending) < self.batch_size:
                    continue
                batch, pending = default_collate(pending), []
                position.batches += 1
                if position.batches == self.batches_per_epoch:
                    yield batch, Position(position.epoch + 1)
                    break
                yield batch, replace(position)
            empty_draws = empty_draws + 1 if seen == 0 else 0
            if empty_draws >= MAX_EMPTY_DRAWS:
                raise UserError(f"{MAX_EMPTY_DRAWS} shards in a row gave no sample (see the warnings above); check the "
                                "data URLs and that the shards are reachable")
            position = Position(position.epoch + 1)

    def eval_batches(self, worker: int, skips: Skips) -> Iterator[Batch]:
        pending = []
        for sample in self._eval_samples(worker, skips):
            decoded = self.decoder(sample, skips)
            if decoded is not None:
                pending.append(decoded)
            if len(pending) == self.batch_size:
                yield default_collate(pending)
                pending = []
        if pending:
            yield default_collate(pending)

    def _epoch_samples(self, worker: int, epoch: int, skips: Skips) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
        if self.batches_per_epoch is None:
            source = self.reader.samples(rng.choice(self.urls), skips, self.decoder.wanted)
        else:
            order = random.Random(f"{self.seed}-{epoch}").sample(self.urls, len(self.urls))
            source = self._cycle(order[self.slot(worker)::self.total], skips)
        return self._shuffle(source, rng)

    def _cycle(self, urls: list[str], skips: Skips) -> Iterator[dict[str, Any]]:
        while True:
            count = 0
            for url in urls:
                for sample in self.reader.samples(url, skips, self.decoder.wanted):
                    count += 1
                    yield sample
            if count == 0:
                raise UserError(f"none of this reader's {len(urls)} shard(s) gave a sample ({urls[0]}, ...; see the "
                                "warnings above); check the data URLs and that the shards are reachable")

    def _shuffle(self, source: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            return source
        import webdataset as wds

        return iter(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(source))

    def _eval_samples(self, worker: int, skips: Skips) -> Iterator[dict[str, Any]]:
        slot, total = self.slot(worker), self.total
        if len(self.urls) >= total:
            for url in self.urls[slot::total]:
                yield from self.reader.samples(url, skips, self.decoder.wanted)
            return
        everything = (s for url in self.urls for s in self.reader.samples(url, skips, self.decoder.wanted))
        yield from itertools.islice(everything, slot, None, total)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed for one sample's augmentation, from its place in the stream."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
