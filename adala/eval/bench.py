"""Measure a linearized (or any) checkpoint: ``python -m adala.eval.bench EXPORT [options]``.

EXPORT is a file ``python -m adala`` wrote (``runs/<run>/export/model.safetensors``): its metadata describe the
model (any timm ViT it was trained from) and its attention; other weight files need ``--model``. Prints parameters, FLOPs per image, peak memory at batch 1
and throughput (with achieved TFLOP/s and MFU) at the given batch sizes, or at 1 and the best size found by
doubling. Definitions: :mod:`adala.eval.efficiency`. On CUDA linear attention takes the Triton fast path unless
``ADALA_LINEAR_ATTENTION=reference`` is set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from adala.errors import UserError
from adala.eval.efficiency import count_flops, describe, device_name, measure, parse_dtype
from adala.models import attention_config, build_vfm, check_img_size, get_vfm, model_spec, read_export_metadata

PROG = "python -m adala.eval.bench"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an adala export (.safetensors) or a weight file with --model")
    parser.add_argument("--model", help="a model entry (conf/model/NAME.yaml); default: the export's metadata")
    parser.add_argument("--img-size", type=int, help="resolution; default: the export's training resolution")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes to time; default: search for the best")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--compile", action="store_true", help="measure torch.compile(model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="dense peak for MFU; default: known GPUs at --dtype")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.export.is_file():
        raise UserError(f"{args.export} not found; pass the path of an export, e.g. runs/<run>/export/model.safetensors")
    parse_dtype(args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; use --device cpu")
    meta = read_export_metadata(args.export) or {}
    name = args.model or meta.get("model")
    if name is None:
        raise UserError(f"{args.export} has no adala metadata naming its model; pass --model NAME")
    spec = model_spec(meta["model_spec"]) if "model_spec" in meta and not args.model else get_vfm(name)
    img_size = args.img_size or meta.get("img_size") or spec.native_img_size
    check_img_size(spec, img_size)
    attention = meta.get("attention")
    flops = count_flops(lambda: build_vfm(spec, img_size=img_size, attention=attention), img_size)
    model = build_vfm(spec, img_size=img_size, weights=args.export)
    result = measure(model, img_size=img_size, dtype=args.dtype, device=device, flops=flops, compile=args.compile,
                     batches=args.batch, max_batch=args.max_batch, peak_tflops=args.peak_tflops)
    return {"export": str(args.export), "model": name, "attention": attention_config(model),
            "device": device_name(device), "torch": torch.__version__, **result}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{result['model']} ({result['attention']['kind']} attention) at {result['img_size']}², {result['dtype']}"
          f"{', compiled' if result['compiled'] else ''}, on {result['device']}")
    print("\n".join(describe(result)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
