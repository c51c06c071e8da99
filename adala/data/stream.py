"""Batches streamed from webdataset tar shards, resumable to the exact batch."""
from __future__ import annotations

import io
import itertools
import logging
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from adala.data.transforms import Transform

log = logging.getLogger(__name__)

# What a stage can ask for, and the tar member each is read from.
FIELDS = {"image": ("png", "jpg", "jpeg", "webp"), "label": ("cls",), "mask": ("seg.png",)}


class ShardStream:
    """Epochs over a shard list: shards and samples shuffled by (seed, epoch), decoded, transformed, batched.

    The state is (epoch, batches yielded in that epoch). Resuming replays the epoch's shuffle and skips the
    consumed samples before they are decoded, so an interrupted run sees exactly the remaining batches.
    Unreadable samples are skipped with a warning and counted in ``skipped``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        fields: Sequence[str],
        transform: Transform,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        repeat: bool = True,
        drop_last: bool = True,
    ) -> None:
        unknown = set(fields) - set(FIELDS)
        if unknown or "image" not in fields:
            raise ValueError(f"fields must include 'image' and be among {sorted(FIELDS)}, got {list(fields)}")
        self.urls = list(urls)
        self.fields = tuple(fields)
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            log.warning("data seed changed from %s to %s; the stream resumes with the new seed", state["seed"], self.seed)
        self.epoch, self.position, self.skipped = int(state["epoch"]), int(state["position"]), int(state["skipped"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            samples = self._samples(self.epoch)
            samples = itertools.islice(samples, self.position * self.batch_size, None)
            for batch in self._batches(samples):
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0
            if not self.repeat:
                return

    def _samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        rng = random.Random(f"{self.seed}-{epoch}")
        urls = list(self.urls)
        if self.shuffle_buffer > 1:
            rng.shuffle(urls)
        stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=self._skip)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        return iter(wds.DataPipeline(*stages))

    def _batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        batch: list[dict[str, torch.Tensor]] = []
        for sample in samples:
            decoded = self._decode(sample)
            if decoded is None:
                continue
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield _collate(batch)

    def _decode(self, sample: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        try:
            raw = {field: _member(sample, FIELDS[field]) for field in self.fields}
            image = Image.open(io.BytesIO(raw["image"])).convert("RGB")
            mask = np.array(Image.open(io.BytesIO(raw["mask"]))) if "mask" in raw else None
            pixels, target = self.transform(image, mask)
        except Exception as err:  # corrupt image, missing label or mask
            self._skip(err, sample.get("__key__"))
            return None
        out = {"image": pixels}
        if target is not None:
            out["mask"] = target
        if "label" in raw:
            out["label"] = torch.tensor(int(raw["label"]))
        return out

    def _skip(self, err: Exception, key: Any = None) -> bool:
        self.skipped += 1
        log.warning("skipping unreadable sample%s: %s", f" {key}" if key else "", err)
        return True


def _member(sample: dict[str, Any], extensions: Sequence[str]) -> bytes:
    for ext in extensions:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample has none of {list(extensions)}")


def _collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}
