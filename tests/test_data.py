"""Shards written and read back, shard lists and their manifests, up-front checks, bad input skipped and
counted, and the transforms."""
from __future__ import annotations

import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from adala.config import DataConfig
from adala.data.pipeline import check_data, eval_stream, resolve_data, train_stream
from adala.data.shards import expand_urls
from adala.data.tario import encode_png, write_samples
from adala.data.transforms import build_transform
from adala.errors import UserError

PLAIN = build_transform("plain", img_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)


def images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(count)]


def samples(count: int, corrupt: tuple[int, ...] = ()) -> list[dict]:
    out = []
    for index, image in enumerate(images(count)):
        png = b"not a png" if index in corrupt else encode_png(image)
        out.append({"__key__": f"{index:05d}", "png": png, "cls": str(index).encode(),
                    "seg.png": encode_png((image[..., 0] > 127).astype(np.uint8))})
    return out


def read_all(data: DataConfig, fields: tuple[str, ...] = ("image", "label")) -> tuple[list[dict], dict[str, int]]:
    stream = eval_stream(resolve_data(data), fields=fields, transform=PLAIN, batch_size=4, rank=0, world_size=1)
    return list(stream), stream.counters()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_written_shards_read_back_with_manifest(tmp_path: Path) -> None:
    manifest = write_samples(samples(25), tmp_path, split="train", per_shard=10)
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 5] and manifest["samples"] == 25
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"
    batches, counts = read_all(DataConfig(val=str(tmp_path / "train-{000000..000002}.tar")), ("image", "label", "mask"))
    assert torch.cat([b["label"] for b in batches]).tolist() == list(range(25))
    pixels = torch.cat([b["image"] for b in batches])
    expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images(25)]).float() / 255
    torch.testing.assert_close(pixels, expected)
    assert batches[0]["mask"].shape == (4, 16, 16) and batches[0]["mask"].dtype == torch.long
    assert sum(counts.values()) == 0


def test_expand_urls(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        expand_urls(str(tmp_path / "x-{0..2}.tar"))
    with pytest.raises(UserError, match="empty"):
        expand_urls("")
    assert expand_urls("http://127.0.0.1:8000/x-{0..1}.tar::pipe:cat /a.tar") == [
        "http://127.0.0.1:8000/x-0.tar", "http://127.0.0.1:8000/x-1.tar", "pipe:cat /a.tar"]


def test_check_data_names_the_fix(tmp_path: Path) -> None:
    write_samples(samples(30), tmp_path, split="train", per_shard=10)
    three = str(tmp_path / "train-{000000..000002}.tar")
    check_data(DataConfig(train=three), mode="epoch", world_size=3, batch_size=1)
    with pytest.raises(UserError, match="data.train is not set"):
        check_data(DataConfig(), mode="resampled", world_size=1, batch_size=1)
    with pytest.raises(UserError, match="fewer than the 4 readers .*lower data.workers"):
        check_data(DataConfig(train=three, workers=2), mode="epoch", world_size=2, batch_size=1)
    check_data(DataConfig(train=three, workers=2), mode="resampled", world_size=2, batch_size=1)  # draws with replacement: fine
    with pytest.raises(UserError, match="data.workers must be 0 or more"):
        check_data(DataConfig(train=three, workers=-1), mode="resampled", world_size=1, batch_size=1)
    (tmp_path / "train.manifest.json").unlink()
    with pytest.raises(UserError, match="set data.train_samples"):
        check_data(DataConfig(train=three), mode="epoch", world_size=1, batch_size=1)
    check_data(DataConfig(train=three, train_samples=30), mode="epoch", world_size=1, batch_size=1)
    with pytest.raises(UserError, match="30 samples, less than one batch for each of the 3 readers"):
        check_data(DataConfig(train=three, train_samples=30), mode="epoch", world_size=3, batch_size=11)


def test_shard_list_that_differs_from_its_manifest_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_samples(samples(30), tmp_path, split="train", per_shard=10)
    with caplog.at_level(logging.WARNING, logger="adala.data"):
        check_data(DataConfig(train=str(tmp_path / "train-{000000..000001}.tar")), mode="resampled", world_size=1, batch_size=1)
    assert "1 of its shard(s) not listed (train-000002.tar)" in caplog.text
    caplog.clear()
    with open(tmp_path / "train-000001.tar", "ab") as shard:
        shard.write(b"\0" * 512)
    with caplog.at_level(logging.WARNING, logger="adala.data"):
        check_data(DataConfig(train=str(tmp_path / "train-{000000..000002}.tar")), mode="resampled", world_size=1, batch_size=1)
    assert "1 shard(s) whose size differs from it (train-000001.tar)" in caplog.text


def test_corrupt_and_incomplete_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    items = samples(12, corrupt=(3,))
    good_png = items[7]["png"]
    items[7]["png"] = good_png[: len(good_png) // 2]  # truncated image
    del items[9]["cls"]
    del items[10]["seg.png"]
    write_samples(items, tmp_path, split="train", per_shard=100)
    batches, counts = read_all(DataConfig(val=str(tmp_path / "train-000000.tar")), ("image", "label", "mask"))
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 2, 4, 5, 6, 8, 11]
    assert counts == {"skipped_corrupt": 2, "skipped_missing_field": 2, "skipped_unreachable": 0, "skipped_truncated": 0}


def test_truncated_shard_and_unreachable_url_are_skipped_and_counted(tmp_path: Path) -> None:
    write_samples(samples(20), tmp_path, split="train", per_shard=10)
    second = tmp_path / "train-000001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])  # cut mid-way, as by a failed copy
    dead = f"http://127.0.0.1:{free_port()}/train-000009.tar"  # nothing listens there
    data = DataConfig(val=f"{tmp_path / 'train-{000000..000001}.tar'}::{dead}", http_retries=0, http_timeout=5)
    batches, counts = read_all(data)
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert labels[:10] == list(range(10)) and 10 <= len(labels) < 20, "the samples before the break are kept"
    assert counts["skipped_unreachable"] == 1 and counts["skipped_truncated"] == 1


def test_stream_of_unusable_samples_stops_with_an_error(tmp_path: Path) -> None:
    items = samples(8)
    for item in items:
        del item["seg.png"]
    write_samples(items, tmp_path, split="train", per_shard=4)
    data = DataConfig(train=str(tmp_path / "train-{000000..000001}.tar"), shuffle_buffer=0)
    stream = train_stream(resolve_data(data), fields=("image", "mask"), mode="epoch", transform=PLAIN, batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(UserError, match="could not be used.*image, mask"):
        next(iter(stream))


def test_seg_transform_crops_and_flips_image_and_mask_together() -> None:
    seg = build_transform("seg", img_size=24, mean=(0.0,) * 3, std=(1.0,) * 3)
    ramp = torch.arange(64).repeat(48, 1)  # value = column, so any crop/flip shows in both
    image = torch.stack([ramp * 4] * 3).to(torch.uint8)
    flipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        pixels, mask = seg(image, ramp.to(torch.uint8))
        assert pixels.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.long
        columns = mask[0].float()
        flipped += bool(columns[0] > columns[-1])
        # Nearest-neighbour mask and antialiased image sample the same columns.
        torch.testing.assert_close(pixels[0, 0] * 255 / 4, columns, atol=2.5, rtol=0)
    assert 0 < flipped < 20
    evaluate = build_transform("eval", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels, mask = evaluate(image)
    assert pixels.shape == (3, 32, 32) and mask is None and pixels.min() >= -1 and pixels.max() <= 1


@pytest.mark.parametrize("name", ["in22k", "coco", "in1k", "ade20k", "cityscapes"])
def test_data_groups_compose_and_their_placeholder_shards_name_the_fix(name: str) -> None:
    from adala.config import compose

    data = compose([f"data={name}"]).data
    assert data.name == name and data.train_samples > 0 and (data.num_classes > 0 or data.num_seg_classes > 0 or name == "coco")
    with pytest.raises(UserError, match=rf"shard /data/{name}/train-000000.tar and \d+ more not found"):
        check_data(data, mode="epoch", world_size=1, batch_size=1)
    with pytest.raises(UserError, match="unknown config key 'data.wrkers'"):
        compose([f"data={name}", "data.wrkers=2"])


def test_colour_jitter_is_one_affine_colour_map() -> None:
    from adala.data.transforms import ColourJitter

    image = torch.rand(3, 8, 8)
    assert torch.allclose(ColourJitter(0, 0, 0, 0)(image), image, atol=1e-6)
    grey = torch.full((3, 8, 8), 0.4)
    outputs = []
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.allclose(ColourJitter(0, 0, 0.4, 0.1)(grey), grey, atol=1e-5), "hue and saturation keep grey"
        torch.manual_seed(seed)
        outputs.append(ColourJitter(0.4, 0.4, 0.4, 0.1)(image))
        assert 0 <= outputs[-1].min() and outputs[-1].max() <= 1
    assert not torch.allclose(outputs[0], outputs[1])


def test_pipe_commands_are_read_and_a_failing_one_is_counted(tmp_path: Path) -> None:
    write_samples(samples(6), tmp_path, split="train", per_shard=3)
    data = DataConfig(val=f"pipe:cat {tmp_path}/train-000000.tar::pipe:cat {tmp_path}/train-000001.tar::pipe:cat {tmp_path}/none.tar")
    batches, counts = read_all(data)
    assert torch.cat([b["label"] for b in batches]).tolist() == list(range(6))
    assert counts["skipped_truncated"] + counts["skipped_unreachable"] == 1
