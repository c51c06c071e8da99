"""Shards written and read back, brace expansion, and unreadable samples skipped and counted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adala.data.shards import encode_png, expand_urls, write_shards
from adala.data.stream import ShardStream
from adala.data.transforms import build_transform
from adala.errors import UserError

PLAIN = build_transform("plain", img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


def samples(count: int, corrupt: tuple[int, ...] = ()) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        png = b"not a png" if index in corrupt else encode_png(image)
        out.append({"__key__": f"{index:05d}", "png": png, "cls": str(index % 3),
                    "seg.png": encode_png((image[..., 0] > 127).astype(np.uint8))})
    return out


def test_written_shards_read_back_in_order(tmp_path: Path) -> None:
    paths = write_shards(samples(25), tmp_path, prefix="train", per_shard=10)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"
    urls = expand_urls(str(tmp_path / "train-{000000..000002}.tar"))
    stream = ShardStream(urls, fields=("image", "label", "mask"), transform=PLAIN, batch_size=5, shuffle_buffer=0,
                         repeat=False, drop_last=False)
    batches = list(stream)
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert labels.tolist() == [i % 3 for i in range(25)]
    assert batches[0]["image"].shape == (5, 3, 16, 16) and batches[0]["mask"].shape == (5, 16, 16)


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    write_shards(samples(12, corrupt=(3, 7)), tmp_path, prefix="train", per_shard=100)
    stream = ShardStream(expand_urls(str(tmp_path / "train-000000.tar")), fields=("image", "label"), transform=PLAIN,
                         batch_size=4, shuffle_buffer=0, repeat=False, drop_last=False)
    labels = np.concatenate([b["label"].numpy() for b in stream])
    assert len(labels) == 10 and stream.skipped == 2


def test_missing_field_is_skipped(tmp_path: Path) -> None:
    items = samples(4)
    del items[1]["cls"]
    write_shards(items, tmp_path, prefix="train", per_shard=100)
    stream = ShardStream([str(tmp_path / "train-000000.tar")], fields=("image", "label"), transform=PLAIN,
                         batch_size=1, shuffle_buffer=0, repeat=False)
    assert len(list(stream)) == 3 and stream.skipped == 1


def test_expand_urls_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        expand_urls(str(tmp_path / "x-{0..2}.tar"))
    assert expand_urls("http://127.0.0.1:8000/x-{0..1}.tar") == ["http://127.0.0.1:8000/x-0.tar", "http://127.0.0.1:8000/x-1.tar"]


def test_stream_resumes_with_the_same_batches(demo_shards: dict[str, str]) -> None:
    transform = build_transform("plain", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)

    def stream() -> ShardStream:
        return ShardStream(expand_urls(demo_shards["pretrain"]), fields=("image", "label"), transform=transform,
                           batch_size=32, seed=3, shuffle_buffer=100)

    # 384 samples / 32 = 12 batches an epoch: 20 batches cross an epoch boundary.
    reference = [b["label"] for _, b in zip(range(20), stream())]
    first = stream()
    head = [b["label"] for _, b in zip(range(7), first)]
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    tail = [b["label"] for _, b in zip(range(13), resumed)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference))
    assert not torch.equal(reference[0], reference[12]), "epochs should be shuffled differently"
