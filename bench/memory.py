"""Per-rank peak memory and step time of Stage 2 (frozen teacher + trained student) for each strategy.

Runs the real ``adala.run.run_stage`` under ``torchrun`` (gloo on CPU, nccl on CUDA) on seeded random images, for
``single`` (1 process) and ``ddp``, ``fsdp`` (replicated and sharded teacher), ``deepspeed`` ZeRO-2 and ZeRO-3
(2 processes each), and writes ``bench/results/memory-<device>.{json,md}``. From the repository root::

    python -m bench.memory [--model dinov2_b] [--img-size 224] [--batch 4] [--steps 6] [--precision fp32]

``--batch`` is per rank. Memory, per rank, while training: the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` when the first batch is drawn, read as each later batch is drawn, so it covers
every step but the last and none of the loading or export), and on CUDA ``torch.cuda.max_memory_allocated``
over the same span. The resident set includes the interpreter and libraries; the resident set before the first
step is recorded beside it. Step time: the mean over the steps after the first ``--warmup`` ones, from the run's
own log (its images/s; all ranks step together). Model FLOPs per image (teacher forward + student forward and
backward, counted as 3× its forward, attention matmuls included) come from ``torch.utils.flop_counter``; with
them each case reports achieved TFLOP/s and, given ``--peak-tflops`` (the device's dense peak at the run's
precision), model FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from adala.eval.efficiency import device_name, proc_status_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "single": (1, ["strategy=single"]),
    "ddp": (2, ["strategy=ddp", "strategy.teacher=replicate"]),
    "fsdp": (2, ["strategy=fsdp", "strategy.teacher=replicate"]),
    "fsdp-sharded-teacher": (2, ["strategy=fsdp", "strategy.teacher=shard"]),
    "deepspeed-zero2": (2, ["strategy=deepspeed", "strategy.zero_stage=2", "strategy.teacher=replicate"]),
    "deepspeed-zero3": (2, ["strategy=deepspeed", "strategy.zero_stage=3", "strategy.teacher=replicate"]),
}


class TrainingPeak:
    """Peak memory between the first and the last batch drawn (see the module docstring)."""

    def __init__(self) -> None:
        self.before_gb = 0.0
        self.peak_rss_gb = 0.0
        self.peak_cuda_gb = 0.0

    def batch_drawn(self, index: int) -> None:
        if index == 0:
            self.before_gb = proc_status_bytes("VmRSS") / 1e9
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            return
        self.peak_rss_gb = max(self.peak_rss_gb, proc_status_bytes("VmHWM") / 1e9)
        if torch.cuda.is_available():
            self.peak_cuda_gb = max(self.peak_cuda_gb, torch.cuda.max_memory_allocated() / 1e9)


class RandomImages:
    """Seeded random images, a different batch on every rank and step; resumable by position."""

    def __init__(self, batch: int, img_size: int, rank: int, peak: TrainingPeak) -> None:
        self.batch, self.img_size, self.rank, self.position, self.peak = batch, img_size, rank, 0, peak

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self.peak.batch_drawn(self.position)
            generator = torch.Generator().manual_seed(self.position * 1000 + self.rank)
            self.position += 1
            yield {"image": torch.randn(self.batch, 3, self.img_size, self.img_size, generator=generator)}


def worker(args: argparse.Namespace) -> None:
    """One rank of one case: train, then write this rank's memory figures."""
    from adala.config import compose, override
    from adala.run import run_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    cfg = compose(["stage=align_features", f"model={args.model}", f"model.img_size={args.img_size}",
                   override("model.weights", args.teacher), override("data.train", args.teacher),
                   override("run_dir", args.run_dir), f"stage.batch_size={args.batch}", f"train.max_steps={args.steps}",
                   "train.log_every=1", "train.save_every=1000000", "train.progress=false",
                   f"train.precision={args.precision}", *args.overrides])
    peak = TrainingPeak()
    run_stage(cfg, stream=RandomImages(args.batch, args.img_size, rank, peak))
    record = {"rank": rank, "rss_before_training_gb": peak.before_gb, "peak_rss_gb": peak.peak_rss_gb}
    if torch.cuda.is_available():
        record["peak_cuda_allocated_gb"] = peak.peak_cuda_gb
    Path(args.run_dir, f"memory-rank{rank}.json").write_text(json.dumps(record))


def run_case(name: str, args: argparse.Namespace, teacher: Path, workdir: Path) -> dict[str, Any]:
    nproc, overrides = CASES[name]
    run_dir = workdir / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bench.memory", "--worker", "--teacher", str(teacher), "--run-dir", str(run_dir),
               "--model", args.model, "--img-size", str(args.img_size), "--batch", str(args.batch),
               "--steps", str(args.steps), "--precision", args.precision, "--", *overrides]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = [entry for entry in log if entry["step"] > args.warmup]
    global_batch = args.batch * nproc
    step_s = sum(global_batch / entry["images_per_s"] for entry in timed) / len(timed)
    ranks = [json.loads((run_dir / f"memory-rank{r}.json").read_text()) for r in range(nproc)]
    budget = [line.split("memory budget (GB): ", 1)[1] for line in done.stderr.splitlines() if "memory budget" in line]
    return {"case": name, "processes": nproc, "threads_per_process": threads, "step_s": step_s,
            "images_per_s": global_batch / step_s, "ranks": ranks, "budget_log": budget}


def stage2_flops_per_image(model: str, img_size: int) -> float:
    """Teacher forward + student forward and backward (3× forward) for one image, in FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from adala.models import build_vfm

    images = torch.zeros(1, 3, img_size, img_size)
    total = 0.0
    for attention, passes in (({"kind": "softmax"}, 1), ({"kind": "linear"}, 3)):
        vit = build_vfm(model, img_size=img_size, attention=attention).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vit.forward_features(images)
        total += passes * counter.get_total_flops()
    return total


def write_results(results: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stamp = {"device": device_name(torch.device(device)), "device_kind": device, "cpus": os.cpu_count(),
             "torch": torch.__version__, "date": datetime.date.today().isoformat(), "model": args.model,
             "img_size": args.img_size, "batch_per_rank": args.batch, "steps": args.steps, "warmup": args.warmup,
             "precision": args.precision, "peak_tflops": args.peak_tflops,
             "stage2_gflops_per_image": results[0]["flops_per_image"] / 1e9 if results else None,
             "command": "python -m bench.memory " + " ".join(sys.argv[1:])}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory-{device}.json").write_text(json.dumps({**stamp, "results": results}, indent=2) + "\n")
    lines = [
        f"# Stage 2 memory and step time per strategy ({args.model}, {args.img_size}², batch {args.batch}/rank, "
        f"{args.precision})", "",
        f"{stamp['device']} ({stamp['cpus']} CPUs), torch {stamp['torch']}, {stamp['date']}. "
        f"Command: `{stamp['command']}`.", "",
        f"Stage-2 model FLOPs per image: {stamp['stage2_gflops_per_image']:.1f} GFLOP (teacher forward + 3× student "
        "forward).", "",
        "| strategy | processes | step (s) | images/s | TFLOP/s | MFU | peak RSS per rank, training (GB) | "
        "RSS before step 1 (GB) |" + (" peak CUDA allocated (GB) |" if device == "cuda" else ""),
        "|---|---:|---:|---:|---:|---:|---|---|" + ("---|" if device == "cuda" else ""),
    ]
    for r in results:
        peaks = " / ".join(f"{rank['peak_rss_gb']:.2f}" for rank in r["ranks"])
        bases = " / ".join(f"{rank['rss_before_training_gb']:.2f}" for rank in r["ranks"])
        cuda = " / ".join(f"{rank.get('peak_cuda_allocated_gb', 0):.2f}" for rank in r["ranks"])
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['case']} | {r['processes']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | "
                     f"{r['achieved_tflops']:.3f} | {mfu} | {peaks} | {bases} |"
                     + (f" {cuda} |" if device == "cuda" else ""))
    lines += ["", "Budget logged by rank 0 at start-up (GB):", ""]
    lines += [f"- {r['case']}: {r['budget_log'][0] if r['budget_log'] else 'n/a'}" for r in results]
    (out / f"memory-{device}.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2_b")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4, help="images per rank")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak at --precision, for MFU (e.g. 989 for an H100 SXM in bf16)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from adala.models import attention_config, build_vfm, save_export

    with tempfile.TemporaryDirectory(prefix="adala-bench-") as tmp:
        teacher = Path(tmp) / "teacher.safetensors"
        model = build_vfm(args.model, img_size=args.img_size)
        save_export(model.state_dict(), teacher, {"model": args.model, "img_size": args.img_size,
                                                  "attention": attention_config(model)})
        del model
        flops = stage2_flops_per_image(args.model, args.img_size)
        results = []
        for name in args.cases:
            result = run_case(name, args, teacher, Path(tmp))
            result["flops_per_image"] = flops
            result["achieved_tflops"] = flops * result["images_per_s"] / 1e12
            result["mfu"] = result["achieved_tflops"] / args.peak_tflops if args.peak_tflops else None
            results.append(result)
            print(f"{name}: {results[-1]['step_s']:.2f} s/step, peak RSS "
                  + ", ".join(f"{r['peak_rss_gb']:.2f}" for r in results[-1]["ranks"]) + " GB", flush=True)
    write_results(results, args, args.out)


if __name__ == "__main__":
    main()
