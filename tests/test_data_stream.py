"""Training and evaluation streams per rank: exact resume (in process and with DataLoader workers), every
sample exactly once in evaluation over 2 ranks x 2 workers, equal batches per rank per epoch, and the
fallback when a state comes from another layout. Ranks are simulated by building each rank's stream in one
process: the splitting is the real one."""
from __future__ import annotations

import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from adala.config import DataConfig
from adala.data.pipeline import eval_stream, resolve_data, train_stream
from adala.data.stream import TrainStream
from adala.data.tario import encode_png, write_tar
from adala.data.transforms import build_transform

ALIGN = build_transform("align", img_size=12, mean=(0.5,) * 3, std=(0.5,) * 3)  # random crop + jitter: seeds matter
PLAIN = build_transform("plain", img_size=12, mean=(0.5,) * 3, std=(0.5,) * 3)


def write_labelled(directory: Path, sizes: list[int]) -> str:
    """Shards of the given sizes; every sample's label is its own number, so a batch says which samples it holds."""
    rng = np.random.default_rng(0)
    numbers = iter(range(sum(sizes)))
    for index, size in enumerate(sizes):
        write_tar(directory / f"train-{index:06d}.tar", [
            {"__key__": f"{i:05d}", "png": encode_png(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)), "cls": str(i).encode()}
            for i in itertools.islice(numbers, size)])
    return str(directory / f"train-{{000000..{len(sizes) - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_labelled(tmp_path_factory.mktemp("stream"), [20] * 6)


def stream(pattern: str, mode: str, workers: int, rank: int = 0, world_size: int = 1, batch_size: int = 8) -> TrainStream:
    data = DataConfig(train=pattern, train_samples=120, workers=workers, shuffle_buffer=16)
    return train_stream(resolve_data(data), fields=("image", "label"), mode=mode, transform=ALIGN, batch_size=batch_size, seed=7,
                        rank=rank, world_size=world_size)


def take(source: TrainStream, count: int) -> list[dict[str, torch.Tensor]]:
    batches = iter(source)
    return [next(batches) for _ in range(count)]


def through_checkpoint(state: dict) -> dict:
    """The state as the engine stores it: torch.save/torch.load with weights_only (plain values only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode,workers", [("resampled", 0), ("epoch", 0), ("resampled", 2), ("epoch", 2)])
def test_stop_and_resume_gives_the_same_batches(shards: str, mode: str, workers: int) -> None:
    # 120 samples, batch 8: an epoch is 15 batches in process, 2 x 7 with two workers; 23 batches cross it.
    reference = take(stream(shards, mode, workers), 23)
    first = stream(shards, mode, workers)
    head = take(first, 9)  # odd: with two workers, the next batch is the second worker's
    resumed = stream(shards, mode, workers)
    resumed.load_state_dict(through_checkpoint(first.state_dict()))
    tail = take(resumed, 14)
    for expected, actual in zip(reference, head + tail, strict=True):
        assert torch.equal(expected["label"], actual["label"])
        assert torch.equal(expected["image"], actual["image"]), "augmentations must resume too"
    labels = torch.cat([b["label"] for b in reference]).tolist()
    assert len(set(labels[:64])) > 48, "samples are spread over the data"
    assert labels[:8] != sorted(labels[:8]), "and shuffled"


def test_epoch_mode_equalises_ranks_and_splits_each_epoch(tmp_path: Path) -> None:
    pattern = write_labelled(tmp_path, [20, 20, 20, 7])  # unequal shards: one rank gets fewer samples
    data = DataConfig(train=pattern, train_samples=67, shuffle_buffer=8)
    per_rank = []
    for rank in (0, 1):
        source = train_stream(resolve_data(data), fields=("image", "label"), mode="epoch", transform=PLAIN, batch_size=8, seed=3,
                              rank=rank, world_size=2)
        assert source.slots.batches_per_epoch == 67 // 16
        epoch = take(source, 4)
        assert source.state_dict()["slots"][0]["epoch"] == 1, "4 batches make this rank's epoch"
        per_rank.append(set(torch.cat([b["label"] for b in epoch]).tolist()))
    assert not per_rank[0] & per_rank[1], "ranks read disjoint shards within an epoch"


@pytest.mark.parametrize("sizes", [[10] * 8, [17, 9, 12]], ids=["shards-per-reader", "samples-per-reader"])
def test_evaluation_sees_every_sample_once_over_2_ranks_x_2_workers(tmp_path: Path, sizes: list[int]) -> None:
    data = DataConfig(val=write_labelled(tmp_path, sizes), workers=2)
    seen, per_rank = [], []
    for rank in (0, 1):
        batches = list(eval_stream(resolve_data(data), fields=("image", "label"), transform=PLAIN, batch_size=4, rank=rank, world_size=2))
        per_rank.append(sum(len(b["label"]) for b in batches))
        seen += torch.cat([b["label"] for b in batches]).tolist()
    assert sorted(seen) == list(range(sum(sizes)))
    assert min(per_rank) > 0


def test_state_from_another_layout_falls_back_to_the_next_epoch(shards: str, caplog: pytest.LogCaptureFixture) -> None:
    two_ranks = stream(shards, "epoch", workers=0, rank=0, world_size=2)
    take(two_ranks, 10)  # 120 // (2 x 8) = 7 batches an epoch: now in epoch 1
    state = two_ranks.state_dict()
    state["slots"][0]["counters"]["skipped_corrupt"] = 3
    results = []
    for rank in (0, 1):
        single = stream(shards, "epoch", workers=2, rank=rank, world_size=2)
        with caplog.at_level(logging.WARNING, logger="adala.data"):
            single.load_state_dict(state)
        assert "workers 0 -> 2" in caplog.text and "epoch 2" in caplog.text
        assert [s["epoch"] for s in single.state_dict()["slots"]] == [2, 2]
        assert single.counters()["skipped_corrupt"] == (3 if rank == 0 else 0), "rank 0 keeps the counts"
        results.append(take(single, 2))
    again = stream(shards, "epoch", workers=2, rank=0, world_size=2)
    again.load_state_dict(state)
    assert all(torch.equal(a["label"], b["label"]) for a, b in zip(take(again, 2), results[0])), "deterministic"
