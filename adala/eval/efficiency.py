"""Inference efficiency of a ViT: parameters, FLOPs, peak memory, throughput, achieved TFLOP/s and MFU.

Shared by ``python -m adala.eval.bench`` (one model, e.g. a user's export) and ``bench/efficiency.py`` (the
softmax-vs-linear tables). Definitions:

* FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the model built on the meta
  device (nothing is computed or allocated), where linear attention takes the reference path, so its matmuls
  are counted like any other; the Triton op would be invisible to the counter. ``attention`` is the part inside
  the blocks' attention modules outside their qkv and proj projections (QKᵀ and AV for softmax; φ(K)ᵀV, φ(Q)S
  and φ(Q)z for linear attention); :func:`attention_flops` gives the same numbers analytically. ``fvcore_style``
  is what fvcore reports as "FLOPs": multiply-accumulates (half the FLOPs) without SDPA, an op fvcore skips —
  so softmax attention counts nothing there while linear attention's explicit matmuls count.
* Throughput: images/s of inference forwards (``torch.inference_mode``) at a fixed batch: median step time over
  timed repeats after warm-up (CUDA events on GPU, ``perf_counter`` on CPU). The batch search doubles the batch
  from 1 while throughput still grows by ≥ 5 %, until memory runs out or a step exceeds the time budget.
  Compiled models: the first call (compilation) is timed separately; from the second batch size on, dynamo
  compiles one graph dynamic in the batch dimension (its default), which later sizes reuse.
* Peak memory, weights and input included. CUDA: ``torch.cuda.max_memory_allocated`` over one forward. CPU
  (Linux): freed memory is handed back to the OS (``malloc_trim``) and the resident-set high-water mark reset
  (``/proc/self/clear_refs``) before one forward; the peak is the high-water mark's rise plus the bytes of
  parameters, buffers and input. Allocator fragmentation may add a little on CPU.
* Achieved TFLOP/s = FLOPs per image × images/s; MFU = that / the device's dense peak at the run's dtype
  (:func:`default_peak_tflops`, or a value the caller passes).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from adala.attention import AttentionPlug
from adala.engine.memory import available_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense (no sparsity) peak TFLOP/s by device-name fragment, first match wins. fp32 is the CUDA-core rate: torch
# runs fp32 matmuls in IEEE fp32 unless TF32 is switched on (then pass the TF32 peak, e.g. 495 on an H100 SXM).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
]
GROWTH = 1.05  # the batch search goes on while throughput grows by at least this factor


def parse_dtype(name: str) -> torch.dtype:
    from adala.errors import UserError

    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        return re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).strip()
    return platform.processor() or platform.machine()


def default_peak_tflops(name: str, dtype: str) -> Optional[float]:
    """The dense peak of a known GPU at ``dtype`` ("float32", "bfloat16", "float16"), else None."""
    return next((peaks[dtype] for fragment, peaks in PEAK_TFLOPS if fragment in name), None)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- FLOPs


def count_flops(build: Callable[[], nn.Module], img_size: int) -> dict[str, float]:
    """FLOPs of one forward of one image: ``total``, ``attention`` and ``fvcore_style`` (see the module docstring).

    ``build`` creates the model; it runs under ``torch.device("meta")``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        images = torch.zeros(1, 3, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    attention = 0
    for name, flops in per_module.items():
        if name.endswith(".attn"):
            attention += flops - per_module.get(f"{name}.qkv", 0) - per_module.get(f"{name}.proj", 0)
    total = counter.get_total_flops()
    softmax = not all(isinstance(block.attn, AttentionPlug) for block in model.blocks)
    sdpa = sum(count for op, count in counter.get_flop_counts()["Global"].items() if _is_sdpa(str(op), softmax))
    return {"total": float(total), "attention": float(attention), "fvcore_style": float(total - sdpa) / 2}


def _is_sdpa(op: str, softmax: bool) -> bool:
    # On the meta device SDPA runs as its math decomposition (bmm); timm's ViTs use bmm nowhere else, and linear
    # attention's torch.matmul calls (also bmm) are ops fvcore does count.
    return "scaled_dot_product" in op or (softmax and op == "aten.bmm")


def attention_flops(kind: str, tokens: int, width: int, head_dim: int, depth: int) -> float:
    """Analytic FLOPs of the attention core per image: softmax QKᵀ and AV, 2·2·N²·width per block; linear
    φ(K)ᵀV and φ(Q)S, 2·2·N·head_dim·width, plus φ(Q)z, 2·N·width (heads × head_dim = width)."""
    if kind == "softmax":
        return float(4 * tokens**2 * width * depth)
    return float((4 * tokens * head_dim * width + 2 * tokens * width) * depth)


# ---------------------------------------------------------------- timing and memory


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model: nn.Module, images: torch.Tensor, *, min_time_s: float = 1.0, max_repeats: int = 50) -> float:
    """Median seconds of one forward, over repeats that last at least ``min_time_s`` (3 to ``max_repeats``)."""
    device = images.device
    times: list[float] = []
    with torch.inference_mode():
        while len(times) < 3 or (sum(times) < min_time_s and len(times) < max_repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(images)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                model(images)
                times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def peak_memory_gb(model: nn.Module, images: torch.Tensor) -> Optional[float]:
    """Peak memory of one forward in GB (1e9 bytes), weights and input included; None where it cannot be read."""
    device = images.device
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(images)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) / 1e9
        with _resident_peak() as rise:
            model(images)
    if rise() is None:
        return None
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers(), images))
    return (rise() + held) / 1e9


@contextlib.contextmanager
def _resident_peak() -> Iterator[Callable[[], Optional[int]]]:
    """Yields a function giving the rise of the resident set's high-water mark (bytes) over the block."""
    status = Path("/proc/self/status")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return memory freed earlier, or the block reuses it unseen
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = proc_status_bytes("VmRSS", status)
    except (OSError, AttributeError):
        before = None
    result: dict[str, Optional[int]] = {"rise": None}
    yield lambda: result["rise"]
    if before is not None:
        result["rise"] = proc_status_bytes("VmHWM", status) - before


def proc_status_bytes(field: str, status: Path = Path("/proc/self/status")) -> int:
    """A ``kB`` field of a ``/proc`` status file (``VmRSS``, ``VmHWM``, ...) in bytes (Linux only)."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.M).group(1)) * 1024


def _out_of_memory(err: BaseException) -> bool:
    message = str(err).lower()
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or any(
        text in message for text in ("out of memory", "can't allocate memory")
    )


# ---------------------------------------------------------------- one model


def measure(
    model: nn.Module,
    *,
    img_size: int,
    dtype: str,
    device: torch.device,
    flops: dict[str, float],
    compile: bool = False,
    batches: Optional[list[int]] = None,
    max_batch: int = 256,
    max_step_s: float = 10.0,
    min_time_s: float = 1.0,
    peak_tflops: Optional[float] = None,
) -> dict[str, Any]:
    """Parameters, FLOPs, peak memory and throughput of ``model`` (on the CPU, any dtype) at ``img_size``.

    ``batches``: the batch sizes to time; None searches for the best one (see the module docstring), stopping
    before a step would exceed ``max_step_s`` or memory would run out. ``flops``: :func:`count_flops`.
    """
    torch_dtype = parse_dtype(dtype)
    model = model.to(device=device, dtype=torch_dtype).eval()
    result: dict[str, Any] = {"params": count_parameters(model), "flops": flops, "img_size": img_size,
                              "dtype": dtype, "compiled": compile, "notes": []}
    peak_tflops = peak_tflops or default_peak_tflops(device_name(device), dtype)
    result["peak_tflops"] = peak_tflops
    runner: nn.Module = torch.compile(model) if compile else model

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, img_size, img_size, device=device, dtype=torch_dtype)

    start_s = time.perf_counter()
    with torch.inference_mode():
        runner(images(1))
        _synchronize(device)
    result["first_call_s"] = time.perf_counter() - start_s  # includes compilation when compiled
    result["peak_gb_batch1"] = peak_memory_gb(runner, images(1))
    rows = []
    for batch in batches or _doublings(max_batch):
        row = _time_batch(runner, images, batch, device, min_time_s, result["notes"])
        if row is None:
            break
        rows.append(row)
        if batches is None and _search_done(rows, max_step_s, result["peak_gb_batch1"], device, result["notes"]):
            break
    for row in rows:
        row.update(_rates(row["images_per_s"], flops["total"], peak_tflops))
    result["batches"] = rows
    if rows:
        result["batch1"] = next((row for row in rows if row["batch"] == 1), None)
        result["best"] = max(rows, key=lambda row: row["images_per_s"])
        result["best"]["peak_gb"] = peak_memory_gb(runner, images(result["best"]["batch"]))
    return result


def _doublings(limit: int) -> Iterator[int]:
    batch = 1
    while batch <= limit:
        yield batch
        batch *= 2


def _time_batch(runner: nn.Module, images: Callable[[int], torch.Tensor], batch: int, device: torch.device,
                min_time_s: float, notes: list[str]) -> Optional[dict[str, Any]]:
    try:
        x = images(batch)
        with torch.inference_mode():
            runner(x)  # warm-up (and recompilation for a new batch size)
        seconds = step_seconds(runner, x, min_time_s=min_time_s)
    except (RuntimeError, MemoryError) as err:
        if not _out_of_memory(err):
            raise
        notes.append(f"batch {batch}: out of memory")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    return {"batch": batch, "step_ms": seconds * 1e3, "images_per_s": batch / seconds}


def _search_done(rows: list[dict[str, Any]], max_step_s: float, peak_gb_batch1: Optional[float],
                 device: torch.device, notes: list[str]) -> bool:
    """Whether doubling the batch again is pointless (no gain), too slow or, on CPU, would exhaust memory."""
    last = rows[-1]
    if len(rows) > 1 and last["images_per_s"] < GROWTH * rows[-2]["images_per_s"]:
        return True
    if 2 * last["step_ms"] / 1e3 > max_step_s:
        notes.append(f"batch search stopped after batch {last['batch']}: a step would exceed {max_step_s:g} s")
        return True
    available = available_bytes(device) if device.type == "cpu" else None
    if available is not None and peak_gb_batch1 is not None and 2 * last["batch"] * peak_gb_batch1 * 1e9 > 0.7 * available:
        notes.append(f"batch search stopped after batch {last['batch']}: the next would need more than 70% of free memory")
        return True
    return False


def _rates(images_per_s: float, flops_per_image: float, peak_tflops: Optional[float]) -> dict[str, Optional[float]]:
    achieved = images_per_s * flops_per_image / 1e12
    return {"tflops_per_s": achieved, "mfu": achieved / peak_tflops if peak_tflops else None}


def describe(result: dict[str, Any]) -> list[str]:
    """Human-readable lines summarising a :func:`measure` result."""
    flops = result["flops"]
    lines = [
        f"params {result['params'] / 1e6:.4g} M; per image {flops['total'] / 1e9:.4g} GFLOP "
        f"(attention {flops['attention'] / 1e9:.4g}; fvcore-style {flops['fvcore_style'] / 1e9:.4g} GMAC)",
        f"first call {result['first_call_s']:.1f} s; peak memory at batch 1: {_gb(result['peak_gb_batch1'])}",
    ]
    for row in result["batches"]:
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
        lines.append(f"batch {row['batch']:>4}: {row['images_per_s']:9.2f} img/s  {row['step_ms']:9.1f} ms/step  "
                     f"{row['tflops_per_s']:8.2f} TFLOP/s{mfu}")
    lines.extend(f"note: {note}" for note in result["notes"])
    return lines


def _gb(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f} GB"
