"""Inference efficiency of softmax ViTs vs their converted versions: the paper's efficiency tables on our code.

For every model × resolution × dtype × mode (eager / torch.compile) × attention (softmax: timm's ViT with SDPA;
any plug of :mod:`adala.attention`, e.g. linear, performer, nystrom: the same model through
``adala.models.linearize`` with the plug's default settings; linear takes the Triton fast path on CUDA and
``--kernel``), with random weights (``pretrained=False``, nothing is downloaded): parameters, FLOPs per image (attention
matmuls included, plus the fvcore-style count the paper's tables use), peak memory at batch 1, throughput at
batch 1 and at the best batch size, each with achieved TFLOP/s and MFU. Definitions: :mod:`adala.eval.efficiency`.
Writes ``<out>/efficiency-<device>.{json,md,png}``. From the repository root, on an H100::

    python -m bench.efficiency --models vit_large_patch14 vit_large_patch16 --sizes 224 512 1024 2048 \\
        --dtypes float32 bfloat16 --modes eager compiled

and a small CPU run: ``python -m bench.efficiency --models vit_tiny_patch16 vit_small_patch16 --sizes 224 448
--dtypes float32 --modes eager``.

Models: the aliases in :data:`MODELS` or any timm ViT name. A resolution that is not a multiple of the patch size
is rounded up to one (ViT-L/14 at 1024² runs at 1036², 74×74 patches = 5477 tokens with the class token), as
padding the image would. Each case runs in its own process (``--case-timeout``; a crash or a timeout is recorded
as a skipped case). A case whose batch-1 forward would, at the FLOP rate of the cases measured so far, take longer
than a tenth of the timeout is skipped without running.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from adala.attention import PLUGS
from adala.eval.efficiency import DTYPES, count_flops, default_peak_tflops, describe, device_name, measure

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "vit_large_patch14": "vit_large_patch14_dinov2",  # DINOv2-L: the paper's main backbone
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_tiny_patch16": "vit_tiny_patch16_224",
}
# The paper's Table 1 / Table 4 (DINOv2-L, one H100, batch 1, fp32): (resolution, attention) → (img/s, peak GB).
PAPER = {
    (512, "softmax"): (36.52, 1.3181), (512, "linear"): (41.56, 1.2163),
    (1024, "softmax"): (7.07, 3.2836), (1024, "linear"): (15.95, 1.3764),
}
PAPER_FLOPS_NOTE = (
    "The paper's FLOPs (softmax 310.60 G at 512², 1241.0 G at 1024²) are fvcore-style multiply-accumulates without "
    "attention at 1025 and 4097 tokens (32² and 64² patches: ViT-L/16 at 512² and 1024²); compare the fvcore GMAC "
    "column of vit_large_patch16."
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_large_patch14", "vit_large_patch16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--attentions", nargs="+", choices=["softmax", *sorted(PLUGS)], default=["softmax", "linear"],
                        help="softmax and/or plugs of adala.attention (each with its default settings)")
    parser.add_argument("--kernel", default="elu1", help="linear-attention kernel")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", nargs="+", default=[], metavar="[DTYPE=]TFLOPS",
                        help="dense peak for MFU, one number for all dtypes or DTYPE=VALUE pairs; default: known GPUs "
                             "(H100 SXM: bfloat16 989, float32 67), none on CPU")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-step-s", type=float, default=10.0, help="the batch search stops before longer steps")
    parser.add_argument("--min-time-s", type=float, default=1.0, help="timed repeats last at least this long")
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds per case (one process)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_for(dtype: str, values: list[str], device: str) -> Optional[float]:
    for value in values:
        name, _, number = value.rpartition("=")
        if name in ("", dtype):
            return float(number)
    return default_peak_tflops(device_name(torch.device(device)), dtype) if device == "cuda" else None


# ---------------------------------------------------------------- worker: one case, in its own process


def builder(model: str, size: int, attention: str, kernel: str) -> tuple[Callable[[], torch.nn.Module], int]:
    """A function building the model with random weights, and the input resolution (a multiple of the patch)."""
    import timm

    from adala.models import linearize

    timm_id = MODELS.get(model, model)
    with torch.device("meta"):
        patch = timm.create_model(timm_id, pretrained=False, img_size=size).patch_embed.patch_size[0]
    px = math.ceil(size / patch) * patch

    def build() -> torch.nn.Module:
        vit = timm.create_model(timm_id, pretrained=False, img_size=px, num_classes=0)
        if attention == "softmax":
            return vit
        return linearize(vit, attention, **({"kernel": kernel} if attention == "linear" else {}))

    return build, px


def worker(case: dict[str, Any]) -> dict[str, Any]:
    build, px = builder(case["model"], case["size"], case["attention"], case["kernel"])
    flops = count_flops(build, px)
    device = torch.device(case["device"])
    torch.manual_seed(0)
    with device:
        model = build()
    result = measure(model, img_size=px, dtype=case["dtype"], device=device, flops=flops,
                     compile=case["mode"] == "compiled", max_batch=case["max_batch"], max_step_s=case["max_step_s"],
                     min_time_s=case["min_time_s"], peak_tflops=case["peak_tflops"])
    result["tokens"] = model.patch_embed.num_patches + model.num_prefix_tokens
    return result


# ---------------------------------------------------------------- report

PENDING_GPU = (
    "**H100 results pending**: this run had no GPU. On an H100, from the repository root: "
    "`python -m bench.efficiency --models vit_large_patch14 vit_large_patch16 --sizes 224 512 1024 2048 "
    "--dtypes float32 bfloat16 --modes eager compiled` (writes `bench/results/efficiency-cuda.*`)."
)
TABLE_HEAD = (
    "| model | size (px, tokens) | dtype | mode | attention | params M | GFLOP | attention GFLOP | fvcore GMAC | "
    "peak GB @1 | img/s @1 | TFLOP/s @1 | MFU @1 | best batch | img/s @best | TFLOP/s @best | MFU @best | "
    "peak GB @best |\n" + "|---" * 5 + "|" + "---:|" * 13
)


def _num(value: Optional[float], digits: int = 2, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _case_label(r: dict[str, Any]) -> str:
    return f"| {r['model']} | {r['size']} | {r['dtype']} | {r['mode']} | {r['attention']} |"


def table_row(r: dict[str, Any]) -> str:
    if r.get("skipped") or not r.get("batch1"):
        return _case_label(r) + f" {r.get('skipped') or 'no batch measured'} |" + " |" * 12
    f, one, best = r["flops"], r["batch1"], r["best"]
    return _case_label(r).replace(f"| {r['size']} |", f"| {r['size']} ({r['img_size']}, {r['tokens']}) |") + " ".join(
        f"{cell} |" for cell in (
            _num(r["params"], 1, 1e-6), _num(f["total"], 1, 1e-9), _num(f["attention"], 1, 1e-9),
            _num(f["fvcore_style"], 1, 1e-9), _num(r["peak_gb_batch1"], 3), _num(one["images_per_s"]),
            _num(one["tflops_per_s"], 3), _num(one["mfu"], 1, 100) + ("%" if one["mfu"] else ""), str(best["batch"]),
            _num(best["images_per_s"]), _num(best["tflops_per_s"], 3),
            _num(best["mfu"], 1, 100) + ("%" if best["mfu"] else ""), _num(best.get("peak_gb"), 3),
        )
    )


def _pairs(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(softmax, plug) results of the same model, size, dtype and mode, both measured, for every plug."""
    key = lambda r: (r["model"], r["size"], r["dtype"], r["mode"])  # noqa: E731
    softmax = {key(r): r for r in results if r["attention"] == "softmax" and r.get("batch1")}
    return [(softmax[key(r)], r) for r in results if r["attention"] != "softmax" and r.get("batch1") and key(r) in softmax]


def ratio_rows(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for soft, lin in _pairs(results):
        rows.append(
            f"| {soft['model']} | {soft['size']} | {soft['dtype']} | {soft['mode']} | {lin['attention']} | "
            f"{soft['flops']['total'] / lin['flops']['total']:.2f}× | "
            f"{lin['batch1']['images_per_s'] / soft['batch1']['images_per_s']:.2f}× | "
            f"{lin['best']['images_per_s'] / soft['best']['images_per_s']:.2f}× | "
            f"{_ratio(soft['peak_gb_batch1'], lin['peak_gb_batch1'])} |"
        )
    return rows


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def paper_rows(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        paper = PAPER.get((r["size"], r["attention"]))
        if paper and r.get("batch1") and r["dtype"] == "float32" and MODELS.get(r["model"], r["model"]).startswith(
                "vit_large"):
            rows.append(f"| {r['model']} | {r['size']} | {r['mode']} | {r['attention']} | {paper[0]} | "
                        f"{r['batch1']['images_per_s']:.2f} | {paper[1]} | {_num(r['peak_gb_batch1'], 3)} |")
    return rows


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        "# Inference efficiency: softmax (timm ViT, SDPA) vs adala's attention plugs (adala linearize)",
        "",
        f"- device: {report['device']} ({report['device_type']}, {report['cpu_threads']} CPU threads; 1-minute load "
        f"average {report['load_average']['start']} at start, {report['load_average']['end']} at end)",
        f"- torch {report['torch']}, timm {report['timm']}, Python {report['python']}, {report['date']}",
        f"- command: `{report['command']}`",
        f"- linear attention: kernel {report['linear_kernel']}"
        + (", Triton fast path" if report["device_type"] == "cuda" else ", reference path (PyTorch ops)"),
        "- random weights; inference forwards (`torch.inference_mode`); @1 = batch 1, @best = the batch size with "
        "the highest throughput (doubling search); peak memory includes weights and input (GB = 1e9 bytes); "
        "GFLOP per image counted by `torch.utils.flop_counter` with attention matmuls; fvcore GMAC = "
        "multiply-accumulates without SDPA (what fvcore calls FLOPs). Definitions: `adala/eval/efficiency.py`.",
    ]
    if report["device_type"] != "cuda":
        lines += [f"- {PENDING_GPU}", "- CPU times are indicative only; compare ratios measured in this run."]
    lines += ["", TABLE_HEAD, *(table_row(r) for r in results), ""]
    ratios = ratio_rows(results)
    if ratios:
        lines += ["## Each attention vs softmax", "",
                  "| model | size | dtype | mode | attention | FLOP ratio (softmax/it) | speed-up @1 | speed-up @best | "
                  "memory ratio @1 (softmax/it) |", "|---|---:|---|---|---|---:|---:|---:|---:|", *ratios, ""]
    lines += ["## The paper's numbers (DINOv2-L, one H100, batch 1, fp32)", "", PAPER_FLOPS_NOTE, ""]
    paper = paper_rows(results)
    if paper:
        lines += ["| model | size | mode | attention | paper img/s | ours img/s | paper peak GB | ours peak GB |",
                  "|---|---:|---|---|---:|---:|---:|---:|", *paper]
    else:
        lines.append("Paper: softmax 36.52 img/s, 1.3181 GB at 512²; 7.07 img/s, 3.2836 GB at 1024²; linear "
                     "41.56 img/s, 1.2163 GB at 512²; 15.95 img/s, 1.3764 GB at 1024². No matching case (ViT-L, "
                     "fp32, 512² or 1024²) was measured in this run.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput at batch 1 and peak memory against tokens per image, one line per model and attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in report["results"] if r.get("batch1")]
    variants = sorted({(r["dtype"], r["mode"]) for r in measured})
    fig, axes = plt.subplots(2, max(1, len(variants)), figsize=(5 * max(1, len(variants)), 8), squeeze=False)
    for column, (dtype, mode) in enumerate(variants):
        throughput, memory = axes[0][column], axes[1][column]
        attentions = list(dict.fromkeys(r["attention"] for r in measured))
        for model in dict.fromkeys(r["model"] for r in measured):
            for attention in attentions:
                style = "o--" if attention == "softmax" else "s^vD<>ph*x"[attentions.index(attention) % 10] + "-"
                points = sorted((r["tokens"], r["batch1"]["images_per_s"], r["peak_gb_batch1"]) for r in measured
                                if (r["model"], r["attention"], r["dtype"], r["mode"]) == (model, attention, dtype, mode))
                if points:
                    tokens, ips, gb = zip(*points)
                    throughput.plot(tokens, ips, style, label=f"{model} {attention}")
                    memory.plot(tokens, [g if g is not None else float("nan") for g in gb], style,
                                label=f"{model} {attention}")
        throughput.set_title(f"{dtype}, {mode}")
        throughput.set_ylabel("images/s at batch 1")
        memory.set_ylabel("peak memory at batch 1 (GB)")
        for ax in (throughput, memory):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens per image")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']} — torch {report['torch']} — {report['date']}\n{report['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- driver


def run_case(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.efficiency", "--worker", json.dumps(case)]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "skipped": f"exceeded the case time limit of {timeout:g} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {**case, "skipped": f"failed: {last[:300]}"}
    return {**case, **json.loads(done.stdout.strip().splitlines()[-1])}


def too_slow(case: dict[str, Any], done: list[dict[str, Any]], timeout: float) -> Optional[str]:
    """Why ``case`` would take too long, judged by the slowest FLOP rate measured so far for its dtype and mode."""
    rates = [r["batch1"]["tflops_per_s"] for r in done if "batch1" in r and r["dtype"] == case["dtype"]
             and r["mode"] == case["mode"] and r.get("batch1")]
    if not rates:
        return None
    build, px = builder(case["model"], case["size"], case["attention"], case["kernel"])
    seconds = count_flops(build, px)["total"] / (min(rates) * 1e12)
    if seconds > timeout / 10:
        return f"skipped: a batch-1 forward would take ≈ {seconds:.0f} s at {min(rates):.2g} TFLOP/s"
    return None


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {"model": model, "size": size, "dtype": dtype, "mode": mode, "attention": attention, "kernel": args.kernel,
         "device": args.device, "max_batch": args.max_batch, "max_step_s": args.max_step_s,
         "min_time_s": args.min_time_s, "peak_tflops": peak_for(dtype, args.peak_tflops, args.device)}
        for model in args.models for dtype in args.dtypes for mode in args.modes for size in sorted(args.sizes)
        for attention in args.attentions
    ]


def header(args: argparse.Namespace, argv: Optional[list[str]]) -> dict[str, Any]:
    import timm

    words = sys.argv[1:] if argv is None else argv
    return {
        "device": device_name(torch.device(args.device)),
        "device_type": args.device,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.efficiency " + shlex.join(words),
        "cpu_threads": torch.get_num_threads(),
        "linear_kernel": args.kernel,
    }


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    report = header(args, argv)
    load_at_start = round(os.getloadavg()[0], 2)
    results: list[dict[str, Any]] = []
    for case in cases(args):
        reason = too_slow(case, results, args.case_timeout)
        result = {**case, "skipped": reason} if reason else run_case(case, args.case_timeout)
        results.append(result)
        label = f"{case['model']} {case['size']} {case['dtype']} {case['mode']} {case['attention']}"
        print(f"== {label}", *(result.get("skipped") and [result["skipped"]] or describe(result)), sep="\n  ", flush=True)
    report["results"] = results
    report["load_average"] = {"start": load_at_start, "end": round(os.getloadavg()[0], 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"efficiency-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem.name}.json, .md and .png")


if __name__ == "__main__":
    main()
