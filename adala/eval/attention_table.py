"""What the attention comparison measures beside its stage runs' metrics: efficiency per attention (through
:mod:`adala.eval.efficiency`) and each student's per-block error against the teacher; and its Table-1 text."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from adala.eval.block_error import relative_block_errors
from adala.eval.efficiency import count_flops, measure
from adala.models import build_vfm, model_spec

COLUMNS = ("top-1", "mIoU", "params (M)", "GFLOPs", "peak MB", "img/s")


def efficiency(model: Any, attention: Mapping[str, Any], *, min_time_s: float = 0.5) -> dict[str, Any]:
    """Parameters, FLOPs per image, batch-1 peak memory and batch-1 images/s of ``model`` (a config's model entry)
    at its resolution with ``attention`` (a spec), random weights, fp32 on the CPU."""
    spec = model_spec(model)
    img_size = model.img_size or spec.native_img_size

    def build() -> torch.nn.Module:
        return build_vfm(spec, img_size=img_size, attention=dict(attention))

    result = measure(build(), img_size=img_size, dtype="float32", device=torch.device("cpu"),
                     flops=count_flops(build, img_size), batches=[1], min_time_s=min_time_s)
    peak_gb = result["peak_gb_batch1"]
    return {"params": result["params"], "gflops": result["flops"]["total"] / 1e9,
            "peak_mb": None if peak_gb is None else peak_gb * 1024, "images_per_s": result["batch1"]["images_per_s"]}


def block_errors(model: Any, teacher: Path, students: Mapping[str, tuple[Path, Mapping[str, Any] | None]],
                 images: torch.Tensor, *, batch_size: int = 16) -> dict[str, list[float]]:
    """Per-block relative error against the softmax ``teacher`` of each student: label → (weights, attention),
    where attention None takes the weights' own (an export) and a spec linearizes the teacher's weights."""
    spec = model_spec(model)

    def build(weights: Path, attention: Mapping[str, Any] | None) -> torch.nn.Module:
        # a plug's parts that no weights hold (Performer's random features of a linearized teacher) are drawn from
        # one seed, so a report of the same runs gives the same errors
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_vfm(spec, img_size=model.img_size, weights=weights,
                             attention=None if attention is None else dict(attention)).eval().requires_grad_(False)

    reference = build(teacher, {"kind": "softmax"})
    batches = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
    return {label: relative_block_errors(reference, build(*student), batches) for label, student in students.items()}


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of ``attention``, ``protocol`` and the :data:`COLUMNS` values as a Markdown table (paper Table 1's shape)."""
    def cell(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["| attention | protocol | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        values = [cell(row.get("top1") and row["top1"] * 100, ".1f"), cell(row.get("miou") and row["miou"] * 100, ".1f"),
                  cell(row["params"] / 1e6, ".2f"), cell(row["gflops"], ".3f"), cell(row["peak_mb"], ".0f"),
                  cell(row["images_per_s"], ".0f")]
        lines.append(f"| {row['attention']} | {row['protocol']} | " + " | ".join(values) + " |")
    return "\n".join(lines)
