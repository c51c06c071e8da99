"""``python -m adala compare [--attentions a,b,...] [demo.key=value ...]``: paper Tables 1–2 in miniature.

On the built-in demo's data and teacher (cached, as ``python -m adala`` trains it), every attention goes through the
paper's protocol for it and through AdaLA's stages (the jobs of :func:`adala.launch.comparison.plan_comparison`,
run one after the other in this process), and the run directory (``demo.run_dir``, default ``runs/compare``) gets:

- ``compare.md`` and ``compare.json``: one row per attention × protocol (and the softmax teacher): top-1, mIoU,
  parameters, GFLOPs, batch-1 peak memory and images/s (fp32, CPU, the demo model at its size);
- ``per_block_error.png`` and ``.json``: the relative error of every block's output against the teacher on held-out
  images, for each attention after AdaLA's alignment (Stage 1 + 2) and after its baseline's (paper Figs. 5/8).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from adala.config import compose, to_yaml
from adala.demo import FRESH_RUNS, _teacher, demo_recipe, demo_shards
from adala.engine.rundir import lock_run_dir
from adala.errors import UserError
from adala.eval import figures
from adala.eval.attention_table import block_errors, efficiency, markdown_table
from adala.eval.students import Compared, validation_images
from adala.eval.run_record import read_run
from adala.files import write_text_atomic
from adala.launch.comparison import REFERENCE, TABLE1_ATTENTIONS, baseline_variant, check_attentions, plan_comparison
from adala.launch.pipeline import MAIN_VARIANT, Job
from adala.models import read_export_metadata
from adala.run import run_stage

DEFAULT_RUN_DIR = "runs/compare"
BLOCK_ERROR_IMAGES = 64
PATHS = ("run_dir", "cache_dir")  # demo keys of this machine, not of the comparison: left out of compare.json
PROTOCOLS = {REFERENCE: "softmax, Stage 3 only", MAIN_VARIANT: "AdaLA: Stage 1 + 2 + 3"}


def parse(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The attentions (``--attentions a,b`` or ``--attentions=a,b``) and the ``demo.*`` overrides."""
    attentions = list(TABLE1_ATTENTIONS)
    overrides: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--attentions" and rest:
            attentions = [a for a in rest.pop(0).split(",") if a]
        elif arg.startswith("--attentions="):
            attentions = [a for a in arg.split("=", 1)[1].split(",") if a]
        elif arg.startswith("demo.") and "=" in arg:
            overrides.append(arg)
        else:
            raise UserError(f"compare takes --attentions a,b,... and demo.key=value overrides, not {arg!r}; e.g. "
                            "adala compare --attentions elu1,performer demo.finetune_steps=100")
    if not any(o.startswith("demo.run_dir=") for o in overrides):
        overrides.append(f"demo.run_dir={DEFAULT_RUN_DIR}")
    return attentions, overrides


def main(args: Sequence[str]) -> dict[str, Any]:
    """Run the comparison; returns what ``compare.json`` holds."""
    attentions, overrides = parse(args)
    check_attentions(attentions)
    cfg = compose(overrides)
    run_dir = Path(cfg.demo.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir, is_main=True)
    try:
        return _compare(cfg, attentions, overrides, run_dir)
    finally:
        lock.release()


def _compare(cfg: Any, attentions: list[str], overrides: list[str], run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    shards, cache = demo_shards(cfg.demo)
    teacher = _teacher(cache, demo_recipe(cfg.demo, shards)["teacher"], [])
    planned = plan_comparison(cfg.model.name, attentions, run_dir, overrides=[*overrides, *FRESH_RUNS], demo=True,
                              teacher=teacher)
    # measured first, in a process that has trained nothing yet (no data workers or threads left from a stage run)
    costs = {attention: efficiency(cfg.model, compose(next(j.overrides for j in jobs if j.variant)).attention)
             for attention, jobs in planned.items()}
    rows = []
    for attention, jobs in planned.items():
        for variant, found in _run(jobs).items():
            protocol = PROTOCOLS.get(variant) or baseline_variant(attention).description.split(": ", 1)[1]
            rows.append({"attention": attention, "protocol": protocol, "variant": variant, **found, **costs[attention]})
    images = validation_images(read_run(planned["softmax"][0].run_dir), shards["val"], BLOCK_ERROR_IMAGES)
    errors = block_errors(cfg.model, teacher, _aligned(planned, attentions, teacher), images)
    figure = figures.block_error(Compared(errors, images[:0], {}), run_dir, name="per_block_error")
    table = markdown_table(rows)
    summary = {"rows": rows, "block_errors": errors, "block_error_images": len(images), "attentions": attentions,
               "figure": figure.png.name, "teacher_pretraining_top1": read_export_metadata(teacher).get("pretrain_top1"),
               "seconds": round(time.perf_counter() - started, 1),
               "demo": {k: v for k, v in dataclasses.asdict(cfg.demo).items() if k not in PATHS}}
    write_text_atomic(run_dir / "compare.md", table + "\n")
    write_text_atomic(run_dir / "compare.json", json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"compare: {run_dir / 'compare.md'}, per-block error: {figure.png}  ({summary['seconds']:.0f} s)")
    return summary


def _run(jobs: Sequence[Job]) -> dict[str, dict[str, float]]:
    """Run ``jobs`` in order; the top-1 and mIoU of each Stage-3 variant."""
    metrics: dict[str, dict[str, float]] = {}
    for job in jobs:
        result = run_stage(compose(job.overrides))
        if job.variant is not None:
            found = metrics.setdefault(job.variant, {})
            found.update({key: result.metrics[key] for key in ("top1", "miou") if key in result.metrics})
    return metrics


def _aligned(planned: dict[str, list[Job]], attentions: Sequence[str], teacher: Path) -> dict[str, tuple[Path, Any]]:
    """The students whose per-block error is drawn: each attention after AdaLA's Stage 1 + 2, and after its
    baseline's alignment (its own Stage 1, or none: the teacher linearized)."""
    students: dict[str, tuple[Path, Any]] = {}
    for attention in attentions:
        steps = {job.step: job for job in planned[attention]}
        students[f"{attention} AdaLA S1+S2"] = (steps["s2"].export, None)
        if baseline_variant(attention).start == "s1":
            students[f"{attention} own Stage 1"] = (steps["s1"].export, None)
        else:
            students[f"{attention} linearized"] = (teacher, read_export_metadata(steps["s1"].export)["attention"])
    return students
