"""Decode + augment throughput of the data pipeline per CPU core, and how many loader workers a GPU needs.

Synthesises photo-like 500×375 JPEGs (smooth shading, blobs and sensor noise; about the size of an ImageNet
photo), writes them into a shard and measures, on one thread (a DataLoader worker uses one core):

* ``decode``: JPEG bytes to a uint8 tensor (``adala.data.decode.decode_image``);
* ``align <S>``: decode + the Stage 1-2 transform at S² (random resized crop, colour jitter, normalise);
* ``stream <S>``: the whole reader at S² (tar reading, shuffle buffer, decode, transform, batches of 16:
  ``adala.data.pipeline.train_stream`` in resampled mode, in process).

Then it models the Stage-2 step of ViT-L/14 on an H100 from the FLOP counts in DESIGN.md §4 and divides the
images/s a GPU consumes by the images/s one core produces. Run from the repository root::

    python -m bench.data [--images 96] [--sizes 224 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adala.config import DataConfig
from adala.data.decode import decode_image
from adala.data.pipeline import resolve_data, train_stream
from adala.data.tario import write_samples
from adala.data.transforms import build_transform
from adala.eval.efficiency import device_name

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 16  # Stage 2: 16 images per GPU (paper Table 5)

# The Stage-2 step of ViT-L/14 at 512² (1370 tokens), per image, from DESIGN.md §4: the frozen softmax teacher's
# forward (1014 GFLOP) plus the linear student's forward and backward (3 × 838 GFLOP: backward ≈ 2 × forward).
GPU = {
    "name": "H100 (bf16 dense 790 TFLOP/s)",
    "peak_tflops": 790.0,
    "utilisation": 0.40,
    "teacher_forward_gflop": 1014.0,
    "student_forward_gflop": 838.0,
    "student_train_factor": 3.0,
    "batch_per_gpu": BATCH,
    "source": "DESIGN.md §4 (ViT-L/14 at 512²: 1014 GFLOP softmax, 838 GFLOP linear attention, per image forward); "
              "40% of bf16 peak is a typical achieved utilisation for ViT-L training",
}


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32) + rng.uniform(40, 200, 3)
    for _ in range(12):  # shading at several scales
        fx, fy = rng.uniform(0.002, 0.05, 2)
        image += np.sin((xx * fx + yy * fy) * 2 * np.pi + rng.uniform(0, 2 * np.pi))[..., None] * rng.uniform(5, 40, 3)
    for _ in range(8):  # objects
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, 80)
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3)
    image += rng.normal(0, 10, image.shape)  # sensor noise and texture
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def rate(run: Callable[[], int], repeats: int) -> float:
    """Images per second: the median over ``repeats`` of (images ``run`` handled / its wall time)."""
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(args: argparse.Namespace, jpegs: list[bytes], shard: str) -> list[dict]:
    rows = [{"case": "decode", "size": None, "images_per_s": rate(lambda: sum(1 for j in jpegs if decode_image(j) is not None), args.repeats)}]
    for size in args.sizes:
        align = build_transform("align", img_size=size, mean=MEAN, std=STD)
        rows.append({"case": "align", "size": size,
                     "images_per_s": rate(lambda: sum(1 for j in jpegs if align(decode_image(j))[0] is not None), args.repeats)})
        data = DataConfig(train=shard, shuffle_buffer=len(jpegs))
        batches = len(jpegs) // BATCH

        def read() -> int:
            stream = iter(train_stream(resolve_data(data), fields=("image",), mode="resampled", transform=align, batch_size=BATCH,
                                       seed=0, rank=0, world_size=1))
            return sum(next(stream)["image"].shape[0] for _ in range(batches))

        rows.append({"case": "stream", "size": size, "images_per_s": rate(read, args.repeats)})
    return rows


def gpu_demand() -> dict:
    per_image_gflop = GPU["teacher_forward_gflop"] + GPU["student_train_factor"] * GPU["student_forward_gflop"]
    achieved_tflops = GPU["peak_tflops"] * GPU["utilisation"]
    step_s = GPU["batch_per_gpu"] * per_image_gflop / (achieved_tflops * 1e3)
    return {**GPU, "per_image_gflop": per_image_gflop, "step_ms": step_s * 1e3, "images_per_s": GPU["batch_per_gpu"] / step_s}


def table(result: dict) -> str:
    gpu = result["gpu"]
    lines = [
        "# Data benchmark: decode + augment per CPU core",
        "",
        f"- device: {result['device']} ({result['cpu_cores']} cores; one thread per measurement; 1-minute load average "
        f"{result['load_start']:.2f} at start, {result['load_end']:.2f} at end{result['note']})",
        f"- torch {result['torch']}, Python {result['python']}, {result['date']}",
        f"- images: {result['images']} synthetic photo-like 500×375 JPEGs (quality 90, mean {result['jpeg_kb']:.0f} kB)",
        "- align: decode + random resized crop (scale 0.25-1) + colour jitter + normalise; stream: the whole reader "
        f"(tar, shuffle buffer, decode, align, batches of {BATCH})",
        "",
        "| case | resolution | images/s per core |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['size'] or '-'} | {r['images_per_s']:.0f} |" for r in result["rows"]]
    stream = next(r for r in result["rows"] if r["case"] == "stream" and r["size"] == 512)
    lines += [
        "",
        "## Loader workers per GPU, Stage 2 (ViT-L/14 at 512², batch 16/GPU)",
        "",
        f"Step model: teacher forward {gpu['teacher_forward_gflop']:.0f} + student forward+backward "
        f"{gpu['student_train_factor']:.0f} × {gpu['student_forward_gflop']:.0f} = {gpu['per_image_gflop']:.0f} GFLOP per "
        f"image; at {gpu['utilisation']:.0%} of {gpu['peak_tflops']:.0f} TFLOP/s one step of {gpu['batch_per_gpu']} images "
        f"takes {gpu['step_ms']:.0f} ms, i.e. {gpu['images_per_s']:.0f} images/s per GPU. Source: {gpu['source']}.",
        "",
        f"One core feeds {stream['images_per_s']:.0f} images/s at 512² (stream), so a GPU needs "
        f"**{result['workers_needed']} worker{'s' if result['workers_needed'] > 1 else ''}** not to wait; `data.workers={result['workers_recommended']}` leaves "
        "headroom for slower images (larger JPEGs, busier nodes).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="e.g. 'other jobs running'")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpegs = [photo(rng) for _ in range(args.images)]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        write_samples(({"__key__": f"{i:06d}", "jpg": j} for i, j in enumerate(jpegs)), Path(tmp), split="bench",
                      per_shard=len(jpegs))
        rows = measure(args, jpegs, str(Path(tmp) / "bench-000000.tar"))
    gpu = gpu_demand()
    stream = next(r for r in rows if r["case"] == "stream" and r["size"] == 512)
    needed = math.ceil(gpu["images_per_s"] / stream["images_per_s"])
    result = {
        "device": device_name(torch.device("cpu")), "device_type": "cpu", "cpu_cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_start": load_start, "load_end": os.getloadavg()[0], "note": f"; {args.note}" if args.note else "",
        "images": len(jpegs), "jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1e3, "rows": rows, "gpu": gpu,
        "workers_needed": needed, "workers_recommended": max(2, math.ceil(needed * 1.5)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "data-cpu.md").write_text(table(result))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
