"""Resolution scaling (the paper's Table 4 and Fig. 9): ``python -m adala.eval.resolution EXPORT --sizes 512 1024
2048 [--teacher WEIGHTS] [--val SHARDS]``.

At every size the export and its softmax teacher are rebuilt for images of that size (position embeddings
resampled as :func:`adala.models.build_vfm` does at any ``img_size``) and measured:

* throughput and peak memory of the backbone at a fixed batch (``--batch``), FLOPs per image
  (:mod:`adala.eval.efficiency`);
* with ``--val``, the mIoU of each model that is a segmentation export (its head included): validation images
  through the data config's evaluation transform at that size (``--data``; a ``scale`` resize grows with the size,
  ``scale × size / crop_size``), predicted by sliding windows of the size at a 2/3 stride as Stage 3 evaluates,
  or whole (``--whole``), in float32.

Without ``--teacher`` the softmax reference is the export's architecture with softmax attention and random
weights, which is enough for efficiency (mIoU needs a trained head). Writes ``resolution-<device>.{json,md,png}``
into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from adala.errors import UserError
from adala.eval.efficiency import count_flops, device_name, measure, parse_dtype
from adala.files import write_text_atomic
from adala.models import (VFMSpec, attention_config, build_vfm, check_img_size, get_vfm, model_spec,
                          read_export_metadata, token_layout)

PROG = "python -m adala.eval.resolution"


@dataclass(frozen=True)
class Entry:
    """One model of the comparison: ``weights`` None builds random weights with ``attention``."""

    role: str  # "export" or "teacher"
    weights: Optional[Path]
    attention: Optional[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def segmenter(self) -> bool:
        return self.weights is not None and "seg_head" in self.meta and "num_seg_classes" in self.meta


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an adala export (.safetensors)")
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="resolutions (pixels per side)")
    parser.add_argument("--teacher", type=Path, help="the softmax teacher's weights (a segmentation export: mIoU too)")
    parser.add_argument("--val", help="validation shards (URL pattern): adds mIoU")
    parser.add_argument("--data", default="ade20k", help="data config (conf/data/NAME.yaml) of the evaluation transform")
    parser.add_argument("--whole", action="store_true", help="predict whole images instead of sliding windows")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the throughput and memory measurement")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time-s", type=float, default=1.0, help="timed repeats last at least this long")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory of resolution-<device>.{json,md,png}")
    return parser.parse_args(argv)


def entries(args: argparse.Namespace) -> list[Entry]:
    """The export and the teacher, checked before anything is built."""
    if not args.export.is_file():
        raise UserError(f"{args.export} not found; pass an export, e.g. runs/<run>/export/model.safetensors")
    meta = read_export_metadata(args.export)
    if not meta or "model" not in meta:
        raise UserError(f"{args.export} has no adala metadata naming its model; pass an export `python -m adala` wrote")
    found = [Entry("export", args.export, None, meta)]
    if args.teacher is None:
        found.append(Entry("teacher", None, {"kind": "softmax"}, meta))
    elif not args.teacher.is_file():
        raise UserError(f"--teacher {args.teacher} not found; pass the softmax weights the export was aligned to")
    else:
        stored = read_export_metadata(args.teacher) or {}
        if (stored.get("attention") or {}).get("kind", "softmax") != "softmax":
            raise UserError(f"--teacher {args.teacher} has {stored['attention']['kind']} attention; pass the softmax "
                            "weights the export was aligned to (or its softmax segmentation export)")
        architecture = {key: meta[key] for key in ("model", "model_spec") if key in meta}  # a plain weight file
        found.append(Entry("teacher", args.teacher, {"kind": "softmax"}, stored if "model" in stored else architecture))
    if args.val is not None and not found[0].segmenter:
        raise UserError(f"--val needs a segmentation export (stage=finetune_seg); {args.export} has no segmentation head")
    return found


def check(args: argparse.Namespace) -> None:
    """The options that need no file."""
    parse_dtype(args.dtype)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; use --device cpu")
    if args.batch < 1 or min(args.sizes) < 1:
        raise UserError(f"--batch and --sizes must be positive, got --batch {args.batch}, --sizes {args.sizes}")


def spec_of(meta: dict[str, Any]) -> VFMSpec:
    return model_spec(meta["model_spec"]) if "model_spec" in meta else get_vfm(meta["model"])


def data_config(name: str, val: str) -> Any:
    """``conf/data/NAME.yaml`` with ``val`` as its validation split (and no training split to read)."""
    from adala.config import compose, override

    return compose([f"data={name}", override("data.val", val), "data.train=null"]).data


def eval_scale(data: Any, size: int) -> Optional[list[int]]:
    """The evaluation resize at ``size``: the data config's ``scale`` times ``size / crop_size``; None (the
    transform's default, ``4·size × size``) where the config has no scale."""
    if not data.scale:
        return None
    crop = data.crop_size or min(data.scale)
    return [max(1, round(side * size / crop)) for side in data.scale]


def segmentation_miou(entry: Entry, data: Any, size: int, *, whole: bool, device: torch.device) -> float:
    """mIoU of the segmentation export ``entry`` on ``data.val``, its backbone and head rebuilt at ``size``."""
    from adala.config import compose
    from adala.data.pipeline import eval_stream, resolve_data
    from adala.data.transforms import build_transform
    from adala.eval import MeanIoU
    from adala.models.weights import read_state_dict
    from adala.stages.common import strip_prefix
    from adala.stages.finetune_seg import FIELDS, Segmenter
    from adala.stages.seg_heads import IGNORE_INDEX, build_head, stored_options

    spec = spec_of(entry.meta)
    classes = int(entry.meta["num_seg_classes"])
    backbone = build_vfm(spec, img_size=size, weights=entry.weights)
    kind = entry.meta["seg_head"]
    options = stored_options(entry.meta, compose(["stage=finetune_seg"]).stage.mask2former)
    head = build_head(kind, embed_dim=backbone.embed_dim, depth=len(backbone.blocks), num_classes=classes,
                      options=options)
    try:
        head.load_state_dict(strip_prefix(read_state_dict(entry.weights), "seg_head."))
    except RuntimeError as err:
        raise UserError(f"the segmentation head of {entry.weights} does not fit the {entry.meta['seg_head']} head "
                        f"its metadata describe: {err}") from None
    model = Segmenter(backbone, classes, head, window=None if whole else (size, max(1, size * 2 // 3)))
    model = model.to(device).eval()
    transform = build_transform(data.eval_transform, img_size=size, mean=spec.mean, std=spec.std,
                                scale=eval_scale(data, size))
    batches = eval_stream(resolve_data(data), fields=FIELDS, transform=transform, batch_size=1, rank=0, world_size=1)
    metric = MeanIoU(classes, ignore_index=IGNORE_INDEX)
    with torch.inference_mode():
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            metric.update(model(batch).prediction.float(), batch)
    return metric.compute()["miou"]


def measure_entry(entry: Entry, size: int, args: argparse.Namespace, data: Optional[Any]) -> dict[str, Any]:
    """One row of the table: ``entry`` at ``size``."""
    device = torch.device(args.device)
    spec = spec_of(entry.meta)
    check_img_size(spec, size)
    model = build_vfm(spec, img_size=size, weights=entry.weights, attention=entry.attention)
    attention, tokens = attention_config(model), token_layout(model, size)["tokens"]
    flops = count_flops(lambda: build_vfm(spec, img_size=size, attention=attention), size)
    result = measure(model, img_size=size, dtype=args.dtype, device=device, flops=flops, batches=[args.batch],
                     min_time_s=args.min_time_s)
    del model
    timed = result.get("best")  # the one batch size timed; absent when it ran out of memory
    miou = None
    if data is not None and entry.segmenter:
        miou = segmentation_miou(entry, data, size, whole=args.whole, device=device)
    return {"role": entry.role, "weights": str(entry.weights) if entry.weights else None,
            "attention": attention["kind"], "img_size": size, "tokens": tokens, "gflops": flops["total"] / 1e9,
            "batch": args.batch, "images_per_s": timed["images_per_s"] if timed else None,
            "peak_gb": timed["peak_gb"] if timed else None, "miou": miou, "notes": result["notes"]}


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
    """Every model at every size, smallest first; ``command`` is recorded with the results."""
    check(args)
    models = entries(args)
    data = data_config(args.data, args.val) if args.val is not None else None
    spec = spec_of(models[0].meta)
    for size in args.sizes:
        check_img_size(spec, size)
    rows = [measure_entry(entry, size, args, data) for size in sorted(set(args.sizes)) for entry in models]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "model": models[0].meta["model"], "export": shown(str(args.export)), "device": device_name(torch.device(args.device)),
        "device_kind": torch.device(args.device).type, "threads": torch.get_num_threads(), "load_average": load,
        "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "val": args.val and shown(args.val), "data": args.data if args.val else None,
        "evaluation": None if args.val is None else ("whole images" if args.whole else "sliding windows (stride 2/3)"),
        "rows": rows,
    }


def _num(value: Optional[float], fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def markdown(report: dict[str, Any]) -> str:
    """The table, and the export's speed and memory relative to the teacher at each size."""
    lines = [
        f"# Resolution scaling: {report['model']} ({report['export']})", "",
        f"- device: {report['device']} ({report['device_kind']}, {report['threads']} threads"
        + (f"; 1-minute load average {report['load_average']:.2f} at the end" if report["load_average"] is not None
           else "") + f"), {report['dtype']}",
        f"- torch {report['torch']}, Python {report['python']}, {report['date']}",
        f"- command: `{report['command']}`",
        "- throughput: images/s of inference forwards of the backbone at the batch shown; peak memory of one such "
        "forward, weights and input included (GB = 1e9 bytes); definitions: `adala/eval/efficiency.py`",
        "- mIoU: " + (f"{report['val']} ({report['data']} evaluation transform), {report['evaluation']}"
                      if report["val"] else "not measured (no validation data)"),
        "", "| size | tokens | model | attention | GFLOP | batch | img/s | peak GB | mIoU |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        miou = _num(None if r["miou"] is None else 100 * r["miou"], ".2f")
        lines.append(f"| {r['img_size']} | {r['tokens']} | {r['role']} | {r['attention']} | {r['gflops']:.3g} | "
                     f"{r['batch']} | {_num(r['images_per_s'], '.3g')} | {_num(r['peak_gb'], '.3f')} | {miou} |")
    lines += ["", "## Export vs teacher", "", "| size | speed-up (export/teacher) | memory ratio (teacher/export) |",
              "|---:|---:|---:|"]
    for size, export, teacher in _pairs(report["rows"]):
        lines.append(f"| {size} | {_ratio(export['images_per_s'], teacher['images_per_s'])} | "
                     f"{_ratio(teacher['peak_gb'], export['peak_gb'])} |")
    return "\n".join(lines) + "\n"


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_size.setdefault(r["img_size"], {})[r["role"]] = r
    return [(size, pair["export"], pair["teacher"]) for size, pair in by_size.items() if len(pair) == 2]


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput, peak memory and (when measured) mIoU against the resolution, export and teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("images_per_s", f"images/s (batch {report['rows'][0]['batch']})", 1.0),
              ("peak_gb", "peak memory (GB)", 1.0)]
    if any(r["miou"] is not None for r in report["rows"]):
        panels.append(("miou", "mIoU (%)", 100.0))
    sizes = sorted({r["img_size"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (key, label, factor) in zip(axes[0], panels):
        for role, style in (("teacher", "o--"), ("export", "s-")):
            points = [(r["img_size"], r[key] * factor) for r in report["rows"] if r["role"] == role
                      and r[key] is not None]
            if points:
                attention = next(r["attention"] for r in report["rows"] if r["role"] == role)
                ax.plot(*zip(*points), style, label=f"{role} ({attention})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        if key != "miou":
            ax.set_yscale("log")
        ax.set_xlabel("resolution (pixels per side)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(temporary, dpi=110)
    plt.close(fig)
    temporary.replace(path)


def write(report: dict[str, Any], out: Path) -> list[Path]:
    """``resolution-<device kind>.json``, ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"resolution-{report['device_kind']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_text_atomic(paths[0], json.dumps(report, indent=2) + "\n")
    write_text_atomic(paths[1], markdown(report))
    plot(report, paths[2])
    return paths


def shown(word: str) -> str:
    """A path as a results file shows it: relative to the working directory when under it, else from ``~`` when
    under the home directory, so the file does not carry the machine's own directories."""
    path = Path(word).expanduser()
    if not path.is_absolute() or not path.exists():
        return word
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        if path.resolve().is_relative_to(base.resolve()):
            return prefix + str(path.resolve().relative_to(base.resolve()))
    return word


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = " ".join([PROG, *map(shown, sys.argv[1:] if argv is None else argv)])
    try:
        report = run(args, command)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    paths = write(report, args.out)
    print(markdown(report))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
