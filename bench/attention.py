"""Softmax attention (``F.scaled_dot_product_attention``) vs the token mixing of adala's attention plugs.

Measures forward+backward wall time and peak memory over a range of token counts and writes
``<out>/attention-<device>.json`` and ``.md``. Run from the repository root::

    python -m bench.attention [--attentions softmax linear performer] [--tokens 256 1024] [--heads 12]
        [--head-dim 64] [--repeats 10] [--dtype float32]

A plug is timed through its ``mix(q, k, v)`` (``linear``: :func:`adala.attention.linear_attention`, kernel elu1),
built with its default settings for ``--heads`` × ``--head-dim`` and told that the N tokens are patches on the
grid closest to a square (settings left to the model, e.g. Linformer's grid, come from that grid). A plug that
fails at some N (e.g. one tied to a fixed token count) is recorded as such.

Each (method, tokens) case is measured in two fresh subprocesses, one for memory and one for time, so no case's
allocations hide or inflate another's peak. Peak memory is what one forward+backward adds on top of its inputs
(q, k, v and the output cotangent): output, saved activations, gradients and workspace.

* CPU: the process's resident-set high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right
  before the call, and the peak is ``VmHWM`` after it minus ``VmRSS`` before it (Linux only). The memory process
  runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensors to the OS at once; otherwise
  freed heap memory stays resident and the peak depends on fragmentation (up to ≈ +50% at mid-sized N). The timing
  process keeps the default allocator, which is what a user gets.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated before.

Timing: one warm-up at the measured shape, then repeats that shrink with the token count (softmax costs O(N²)):
``max(1, repeats * 1024 // max(N, 1024))``; the median is reported. On a shared CPU the times depend on other load:
linear attention is some 30 small multithreaded ops, each waiting for all its threads, so one busy core slows it
far more than SDPA's single fused kernel. The 1-minute load average at start and end is recorded for that reason.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from adala.attention import PLUGS, get_plug, linear_attention
from adala.eval.efficiency import device_name, proc_status_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENS = [256, 512, 1024, 2048, 4096, 8192, 16384]
METHODS = ["softmax", *sorted(PLUGS)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_METHOD = {
    "cpu": "resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) minus resident set before the "
    "call, in a fresh process per case, with glibc returning freed memory at once (MALLOC_MMAP_THRESHOLD_=65536)",
    "cuda": "torch.cuda.max_memory_allocated minus memory allocated before the call, in a fresh process per case",
}
TIMING_METHOD = {"cpu": "time.perf_counter", "cuda": "CUDA events"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attentions", nargs="+", choices=METHODS, default=["softmax", "linear"],
                        help="softmax (SDPA) and/or plugs of adala.attention; ratios are against the first")
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats at N ≤ 1024, fewer above")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", metavar="METHOD", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def repeats_for(tokens: int, repeats: int) -> int:
    return max(1, repeats * 1024 // max(tokens, 1024))


# ---------------------------------------------------------------- worker: one method at one token count


def _grid(tokens: int) -> tuple[int, int]:
    """The rows × columns closest to a square with ``tokens`` cells."""
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rows, tokens // rows


def mixer(method: str, tokens: int, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """The function of (q, k, v) that ``method`` computes for ``tokens`` tokens."""
    if method == "softmax":
        return F.scaled_dot_product_attention
    if method == "linear":
        return linear_attention
    plug_class, grid = get_plug(method), _grid(tokens)
    with torch.device(args.device):
        plug = plug_class(args.heads * args.head_dim, args.heads, head_dim=args.head_dim, dtype=DTYPES[args.dtype],
                          **plug_class.settings_for_model({}, grid))
    plug.set_token_layout(0, grid)
    return plug.mix


def _forward_backward(fn: Callable[..., torch.Tensor], q, k, v, cotangent) -> None:
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward(cotangent)


def _peak_mb(device: str, run: Callable[[], None]) -> float:
    """Memory that ``run`` adds at its peak over what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = proc_status_bytes("VmRSS")
    run()
    return (proc_status_bytes("VmHWM") - before) / 2**20


def _time_ms(device: str, run: Callable[[], None]) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    run()
    return (time.perf_counter() - start_s) * 1e3


def _inputs(tokens: int, args: argparse.Namespace) -> list[torch.Tensor]:
    shape = (1, args.heads, tokens, args.head_dim)
    opts = dict(device=args.device, dtype=DTYPES[args.dtype])
    q, k, v = (torch.randn(shape, **opts, requires_grad=True) for _ in range(3))
    return [q, k, v, torch.randn(shape, **opts)]


def worker(method: str, tokens: int, measure: str, args: argparse.Namespace) -> dict:
    """The peak memory of one forward+backward, or the median time of the repeats after a warm-up."""
    _forward_backward(mixer(method, 16, args), *_inputs(16, args))  # load kernels, start thread pools: not in the peak
    run = functools.partial(_forward_backward, mixer(method, tokens, args), *_inputs(tokens, args))
    if measure == "memory":
        return {"peak_mb": _peak_mb(args.device, run)}
    run()
    times = [_time_ms(args.device, run) for _ in range(repeats_for(tokens, args.repeats))]
    return {"ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}


# ---------------------------------------------------------------- driver


def run_worker(method: str, tokens: int, measure: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "bench.attention", "--worker", method, "--measure", measure, "--tokens", str(tokens),
        "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--repeats", str(args.repeats),
        "--dtype", args.dtype, "--device", args.device,
    ]  # fmt: skip
    env = dict(os.environ)
    if measure == "memory" and args.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"failed": last[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(method: str, tokens: int, args: argparse.Namespace) -> dict:
    memory = run_worker(method, tokens, "memory", args)
    return memory if "failed" in memory else {**memory, **run_worker(method, tokens, "time", args)}


def header(args: argparse.Namespace) -> dict:
    return {
        "device": device_name(torch.device(args.device)),
        "device_type": args.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "batch": 1,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "attentions": args.attentions,
            "linear_kernel": "elu1",
            "repeats": {str(n): repeats_for(n, args.repeats) for n in args.tokens},
            "cpu_threads": torch.get_num_threads(),
        },
        "measured": "forward + backward w.r.t. q, k, v; time is the median over repeats (min in the JSON)",
        "timing": TIMING_METHOD[args.device],
        "peak_memory": MEMORY_METHOD[args.device] + "; excludes the inputs q, k, v and the output cotangent",
    }


def compare(tokens: int, args: argparse.Namespace) -> dict:
    """Every attention at ``tokens`` tokens, with time and memory ratios against the first (``--attentions``)."""
    cases = {method: run_case(method, tokens, args) for method in args.attentions}
    base = cases[args.attentions[0]]
    for case in cases.values():
        if "failed" not in case and "failed" not in base:
            case["speed_ratio"] = base["ms"] / case["ms"]
            case["memory_ratio"] = base["peak_mb"] / case["peak_mb"]
    row = {"tokens": tokens, "attentions": cases}
    print(*markdown_rows(row), sep="\n", flush=True)
    return row


def markdown_rows(row: dict) -> list[str]:
    lines = []
    for method, case in row["attentions"].items():
        if "failed" in case:
            lines.append(f"| {row['tokens']} | {method} | failed: {case['failed']} | | | | |")
        else:
            ratios = (f"{case['speed_ratio']:.2f}× | {case['memory_ratio']:.2f}×" if "speed_ratio" in case
                      else "– | –")
            lines.append(f"| {row['tokens']} | {method} | {case['ms']:.1f} | {case['peak_mb']:.1f} | {ratios} | "
                         f"{case['repeats']} |")
    return lines


def table_head(base: str) -> str:
    return (f"| N | attention | ms | peak MB | speed ratio ({base}/it) | memory ratio ({base}/it) | repeats |\n"
            "|---:|---|---:|---:|---:|---:|---:|")


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Attention benchmark: {', '.join(s['attentions'])} (softmax: SDPA; linear: kernel {s['linear_kernel']})",
        "",
        f"- device: {report['device']} ({report['device_type']}, {s['cpu_threads']} CPU threads; 1-minute load "
        f"average {report['load_average']['start']} at start, {report['load_average']['end']} at end)",
        f"- torch {report['torch']}, Python {report['python']}, {report['date']}",
        f"- batch 1, {s['heads']} heads × head_dim {s['head_dim']}, {s['dtype']}",
        f"- {report['measured']}; repeats per N: {s['repeats']}",
        f"- timing: {report['timing']}",
        f"- peak memory: {report['peak_memory']}",
        "",
        table_head(s["attentions"][0]),
        *(line for row in report["results"] for line in markdown_rows(row)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens[0], args.measure, args)))
        return
    report = header(args)
    load_at_start = round(os.getloadavg()[0], 2)
    print(table_head(args.attentions[0]), flush=True)
    report["results"] = [compare(n, args) for n in args.tokens]
    report["load_average"] = {"start": load_at_start, "end": round(os.getloadavg()[0], 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"attention-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem.name}.json and {stem.name}.md")


if __name__ == "__main__":
    main()
