"""``python -m adala compare [--attentions a,b,...] [demo.key=value ...]``: paper Tables 1–2 in miniature;
``python -m adala compare --runs ROOT``: the same report from a launcher's comparison (``--attentions``) in ``ROOT``.

On the built-in demo's data and teacher (cached, as ``python -m adala`` trains it), every attention goes through the
paper's protocol for it and through AdaLA's stages (the jobs of :func:`adala.launch.comparison.plan_comparison`,
run one after the other in this process), and the run directory (``demo.run_dir``, default ``runs/compare``) gets:

- ``compare.md`` and ``compare.json``: one row per attention × protocol (and the softmax teacher): top-1, mIoU,
  parameters, GFLOPs, batch-1 peak memory and images/s (fp32, CPU, the demo model at its size);
- ``per_block_error.png`` and ``.json``: the relative error of every block's output against the teacher on held-out
  images, for each attention after AdaLA's alignment (Stage 1 + 2) and after its baseline's (paper Figs. 5/8).

The report reads everything but the efficiency from the jobs' run directories (``metrics.json``, exports,
``config.yaml``), so it is the same whether the jobs ran here or on a cluster.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from adala.config import compose, to_yaml
from adala.demo import FRESH_RUNS, _teacher, demo_recipe, demo_shards
from adala.engine.rundir import lock_run_dir
from adala.errors import UserError
from adala.eval import figures
from adala.eval.attention_table import block_errors, efficiency, markdown_table
from adala.eval.students import Compared, validation_images
from adala.eval.run_record import RunRecord, read_run
from adala.files import write_text_atomic
from adala.launch.comparison import (REFERENCE, TABLE1_ATTENTIONS, attention_list, baseline_variant,
                                     check_attentions, plan_comparison, read_record)
from adala.launch.pipeline import MAIN_VARIANT, Job
from adala.models import read_export_metadata
from adala.run import run_stage

DEFAULT_RUN_DIR = "runs/compare"
BLOCK_ERROR_IMAGES = 64
PATHS = ("run_dir", "cache_dir")  # demo keys of this machine, not of the comparison: left out of compare.json
PROTOCOLS = {REFERENCE: "softmax, Stage 3 only", MAIN_VARIANT: "AdaLA: Stage 1 + 2 + 3"}


def parse(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The attentions (``--attentions a,b`` or ``--attentions=a,b``) and the ``demo.*`` overrides, and
    ``model.img_size=N``: every job at that resolution (more tokens; the demo's teacher, trained at 32², has its
    position embeddings resampled as for any other size)."""
    if "--runs" in args:
        raise UserError("--runs ROOT takes nothing else: adala compare --runs runs/compare_cluster")
    attentions = list(TABLE1_ATTENTIONS)
    overrides: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--attentions" and rest:
            attentions = attention_list(rest.pop(0))
        elif arg.startswith("--attentions="):
            attentions = attention_list(arg.split("=", 1)[1])
        elif (arg.startswith("demo.") and "=" in arg) or arg.startswith("model.img_size="):
            overrides.append(arg)
        else:
            raise UserError(f"compare takes --attentions a,b,..., demo.key=value overrides and model.img_size=N, not "
                            f"{arg!r}; e.g. adala compare --attentions elu1,performer demo.finetune_steps=100")
    if not any(o.startswith("demo.run_dir=") for o in overrides):
        overrides.append(f"demo.run_dir={DEFAULT_RUN_DIR}")
    return attentions, overrides


def main(args: Sequence[str]) -> dict[str, Any]:
    """Run the comparison (or report a launcher's, ``--runs ROOT``); returns what ``compare.json`` holds."""
    if args[:1] == ["--runs"] and len(args) == 2:
        return report_runs(Path(args[1]))
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
    costs = _costs(planned, lambda job: compose(job.overrides))
    for jobs in planned.values():
        for job in jobs:
            run_stage(compose(job.overrides))
    extra = {"teacher_pretraining_top1": read_export_metadata(teacher).get("pretrain_top1"),
             "demo": {k: v for k, v in dataclasses.asdict(cfg.demo).items() if k not in PATHS}}
    return write_report(planned, teacher, run_dir, costs, started=started, extra=extra)


def report_runs(root: Path) -> dict[str, Any]:
    """The report of a launcher's comparison, from the run directories its jobs left under ``root``."""
    started = time.perf_counter()
    planned, teacher = read_record(root)
    unfinished = [job.name for jobs in planned.values() for job in jobs if not _finished(job)]
    if unfinished:
        raise UserError(f"{len(unfinished)} job(s) of the comparison in {root} have not finished: "
                        f"{', '.join(unfinished[:4])}{' ...' if len(unfinished) > 4 else ''}; report when they have")
    costs = _costs(planned, lambda job: read_run(job.run_dir).cfg)
    return write_report(planned, teacher, root, costs, started=started, extra={"root": str(root)})


def write_report(planned: Mapping[str, Sequence[Job]], teacher: Path, run_dir: Path,
                 costs: Mapping[str, dict[str, Any]], *, started: float, extra: Mapping[str, Any]) -> dict[str, Any]:
    """``compare.md``, ``compare.json`` and the per-block error figure in ``run_dir``, from the finished jobs of
    ``planned`` (keyed by attention, "softmax" the reference) and ``costs`` (efficiency per attention)."""
    attentions = [attention for attention in planned if attention != "softmax"]
    rows = []
    for attention, jobs in planned.items():
        for variant, found in _metrics(jobs).items():
            protocol = PROTOCOLS.get(variant) or baseline_variant(attention).description.split(": ", 1)[1]
            rows.append({"attention": attention, "protocol": protocol, "variant": variant, **found, **costs[attention]})
    reference = _reference_run(planned)
    images = validation_images(reference, reference.cfg.data.val, BLOCK_ERROR_IMAGES)
    errors = block_errors(reference.cfg.model, teacher, _aligned(planned, attentions, teacher), images)
    figure = figures.block_error(Compared(errors, images[:0], {}), run_dir, name="per_block_error")
    table = markdown_table(rows)
    summary = {"rows": rows, "block_errors": errors, "block_error_images": len(images), "attentions": attentions,
               "figure": figure.png.name, **extra, "seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(run_dir / "compare.md", table + "\n")
    write_text_atomic(run_dir / "compare.json", json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"compare: {run_dir / 'compare.md'}, per-block error: {figure.png}  ({summary['seconds']:.0f} s)")
    return summary


def _costs(planned: Mapping[str, Sequence[Job]], config_of: Callable[[Job], Any]) -> dict[str, dict[str, Any]]:
    """The efficiency of every attention, with the model and attention of its first Stage-3 job's config."""
    costs = {}
    for attention, jobs in planned.items():
        cfg = config_of(next(job for job in jobs if job.variant))
        costs[attention] = efficiency(cfg.model, cfg.attention)
    return costs


def _metrics(jobs: Sequence[Job]) -> dict[str, dict[str, float]]:
    """The top-1 and mIoU of each Stage-3 variant among ``jobs``, from their run directories' ``metrics.json``."""
    metrics: dict[str, dict[str, float]] = {}
    for job in jobs:
        if job.variant is not None:
            found = json.loads((job.run_dir / "metrics.json").read_text())
            metrics.setdefault(job.variant, {}).update({key: found[key] for key in ("top1", "miou") if key in found})
    return metrics


def _finished(job: Job) -> bool:
    """A Stage-3 job has evaluated (``metrics.json``); any other job has its export."""
    return (job.run_dir / "metrics.json").is_file() if job.variant else job.export.is_file()


def _reference_run(planned: Mapping[str, Sequence[Job]]) -> RunRecord:
    """The softmax reference's first Stage-3 run: its model entry and validation data are the report's."""
    return read_run(next(job for job in planned["softmax"] if job.variant).run_dir)


def _aligned(planned: Mapping[str, Sequence[Job]], attentions: Sequence[str],
             teacher: Path) -> dict[str, tuple[Path, Any]]:
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
