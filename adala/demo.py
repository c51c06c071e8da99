"""The built-in demo: the whole method and the paper's Table-3 ablation, in miniature, on procedural shapes.

1. write the data set as tar shards and train a small softmax ViT teacher on it (both cached);
2. Stage 1 (attention alignment) and Stage 2 (feature alignment), with and without Stage 1;
3. Stage 3 (classification and segmentation fine-tuning) for every variant, evaluated on held-out data;
4. print a table and write ``report.json`` in the run directory, and the figures of every run (``adala report``)
   in ``report/`` beside it, linked from ``report.json``.

Steps 2 and 3 are the jobs of the pipelines' graph (``adala.launch.pipeline.plan`` with ``ablation``), run one
after the other in this process; every job is an ordinary stage run, composed from the same config files as
``python -m adala stage=...``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from adala.config import Config, DemoConfig, compose, override, to_yaml, without_attention
from adala.data.demo_data import ensure_demo_shards
from adala.data.demo_images import NUM_CLASSES, NUM_SEG_CLASSES
from adala.data.demo_images import VERSION as DATA_VERSION
from adala.models import save_export
from adala.models.weights import read_export_metadata, read_state_dict
from adala.engine.rundir import lock_run_dir
from adala.eval.report import write_report
from adala.files import write_text_atomic
from adala.errors import UserError
from adala.launch.pipeline import DEFAULT_DEMO_TASKS, VARIANTS, plan
from adala.run import run_stage

log = logging.getLogger(__name__)

# Every stage run of the demo starts over: its run directory is the demo's own.
FRESH_RUNS = ("resume=none", "overwrite=true")
ADAPT_TASK = "adapt_task"  # demo.adapt_task's row: the task model adapted directly (paper 4.3.3)
SEG_TASKS = {"linear": ("seg",), "mask2former": ("mask2former",), "both": ("seg", "mask2former")}  # demo.seg
# The report's columns: a metric of a default task under its own name, the Mask2Former task's as miou_mask2former.
COLUMNS = {"top1": "top-1", "miou": "mIoU", "miou_mask2former": "M2F mIoU"}


def run_demo(cfg: Config, overrides: Sequence[str] = ()) -> dict:
    """Run the demo with the sizes in ``cfg.demo``: the cached teacher, then the jobs of the ablation graph for
    ``cfg.model`` in order; ``overrides`` (the user's) are applied to every stage run."""
    started = time.perf_counter()
    run_dir = Path(cfg.demo.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir, is_main=True)  # a second demo into the same directory is refused
    try:
        return _run_demo(cfg, overrides, run_dir, started)
    finally:
        lock.release()


def _run_demo(cfg: Config, overrides: Sequence[str], run_dir: Path, started: float) -> dict:
    demo = cfg.demo
    tasks = demo_tasks(demo)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    shards, cache = demo_shards(demo)
    recipe = demo_recipe(demo, shards)
    user = [o for o in overrides if not o.startswith(("stage=", "run_dir=", "demo.", "resume=", "overwrite="))]
    teacher = _teacher(cache, recipe["teacher"], user)
    sizes = [o for o in overrides if o.startswith("demo.")]
    jobs = plan([cfg.model.name], run_dir, tasks=tasks, overrides=[*sizes, *user, *FRESH_RUNS], demo=True,
                ablation=True, teacher=teacher)
    metrics: dict[str, dict[str, float]] = {name: {} for name in VARIANTS}
    for job in jobs:
        result = run_stage(compose(job.overrides))
        if job.variant is not None:
            metrics[job.variant].update(_row_metrics(job.task, result.metrics))
    report = {name: {"description": variant.description, **metrics[name]} for name, variant in VARIANTS.items()}
    if demo.adapt_task:
        segmenter = next(job for job in jobs if job.variant == "teacher" and job.stage == "finetune_seg")
        report[ADAPT_TASK] = {"description": "softmax segmenter adapted directly, Stage 1 + 2 (paper 4.3.3)",
                              **_row_metrics(segmenter.task, _adapt_task(cfg.model.name, run_dir, segmenter.export,
                                                                         recipe, shards["val"], user))}
    report_path = run_dir / "report.json"
    # the pictures: every stage's losses, Stage 2 with and without Stage 1, per-block error and PCA maps
    figures = write_report([job.run_dir for job in jobs], run_dir / "report", images=shards["val"])
    summary = {
        "variants": report,
        "figures": str(figures.page.relative_to(run_dir)),
        "teacher_pretraining_top1": read_export_metadata(teacher).get("pretrain_top1"),
        "seconds": round(time.perf_counter() - started, 1),
        "demo": dataclasses.asdict(demo),
    }
    write_text_atomic(report_path, json.dumps(summary, indent=2) + "\n")
    print(format_table(report))
    print(f"report: {report_path}, figures: {figures.page}  ({summary['seconds']:.0f} s)")
    return summary


def _adapt_task(model: str, run_dir: Path, segmenter: Path, recipe: dict[str, list[str]], val: str,
                user: list[str]) -> dict[str, float]:
    """``demo.adapt_task``: Stage 1 → 2 of the task route (``stage.task_model``) from the fine-tuned softmax
    segmenter, on the Stage-1/2 data and steps; the metrics of the Stage-2 student on the validation split."""
    init: list[str] = []
    for stage, name in (("align_attention", "s1_task_seg"), ("align_features", "s2_task_seg")):
        result = run_stage(compose([
            f"stage={stage}", f"model={model}", override("run_dir", run_dir / model / name), *recipe[stage], *init,
            override("model.weights", segmenter), "stage.task_model=true", override("data.val", val), *user,
            *FRESH_RUNS]))
        init = [override("stage.init", result.export)]
    return result.metrics


def demo_tasks(demo: DemoConfig) -> list[str]:
    """The Stage-3 tasks of every variant: classification and ``demo.seg``'s segmentation heads."""
    if demo.seg not in SEG_TASKS:
        raise UserError(f"unknown demo.seg {demo.seg!r}; use one of {', '.join(SEG_TASKS)}")
    return ["cls", *SEG_TASKS[demo.seg]]


def _row_metrics(task: str, metrics: dict[str, float]) -> dict[str, float]:
    return metrics if task in DEFAULT_DEMO_TASKS else {f"{key}_{task}": value for key, value in metrics.items()}


def format_table(report: dict) -> str:
    columns = {key: label for key, label in COLUMNS.items() if key == "top1" or any(key in r for r in report.values())}
    header = "".join(f"{label:>10}" for label in columns.values())
    lines = [f"{'variant':<16}{header}  description", "-" * (50 + len(header))]
    for variant, row in report.items():
        cells = "".join(f"{row[key] * 100:>9.1f}%" if key in row else f"{'-':>10}" for key in columns)
        lines.append(f"{variant:<16}{cells}  {row['description']}")
    return "\n".join(lines)


def demo_shards(demo: DemoConfig) -> tuple[dict[str, str], Path]:
    """Write the demo's data set as tar shards (cached by its sizes); returns the URLs of each split and the cache."""
    counts = {"pretrain": demo.pretrain_samples, "finetune": demo.finetune_samples, "val": demo.val_samples}
    key = {**counts, "per_shard": demo.samples_per_shard}
    cache = _cache_dir(demo.cache_dir) / f"demo-v{DATA_VERSION}-{_digest(key)}"
    return ensure_demo_shards(cache, counts, per_shard=demo.samples_per_shard), cache


def demo_recipe(demo: DemoConfig, shards: dict[str, str]) -> dict[str, list[str]]:
    """The overrides of each demo step: data (``data=demo`` where no Stage-3 task names it: every stage defaults
    to the paper's data set), steps, batch sizes and learning rates; no weights and no run dirs.

    Keys: ``teacher`` (``stage=finetune_cls`` of a softmax ViT on the pretraining split; its backbone is the teacher),
    ``align_attention``, ``align_features``, ``finetune`` (for every Stage-3 task) and, for a task with steps of its
    own, the task's name (``mask2former``: after ``finetune``).
    """
    mask2former_steps = demo.finetune_steps if demo.mask2former_steps is None else demo.mask2former_steps
    pretrain = ["data=demo", override("data.train", shards["pretrain"])]
    return {
        "teacher": [  # for stage=finetune_cls
            "attention=softmax", *pretrain, override("data.val", shards["val"]),
            f"data.num_classes={NUM_CLASSES}", f"train.max_steps={demo.teacher_steps}",
            f"stage.batch_size={demo.teacher_batch_size}", f"stage.optim.lr={demo.teacher_lr}",
            "stage.optim.backbone_lr_scale=1.0", "stage.optim.warmup_steps=50",
        ],
        "align_attention": [*pretrain, f"train.max_steps={demo.align_attention_steps}",
                            f"stage.batch_size={demo.align_batch_size}", f"stage.optim.lr={demo.align_attention_lr}"],
        "align_features": [*pretrain, f"train.max_steps={demo.align_features_steps}",
                           f"stage.batch_size={demo.align_batch_size}", f"stage.optim.lr={demo.align_features_lr}"],
        "finetune": [
            override("data.train", shards["finetune"]), override("data.val", shards["val"]),
            f"data.num_classes={NUM_CLASSES}", f"data.num_seg_classes={NUM_SEG_CLASSES}",
            f"train.max_steps={demo.finetune_steps}", f"stage.batch_size={demo.finetune_batch_size}",
            f"stage.optim.lr={demo.finetune_lr}",
        ],
        "mask2former": [f"train.max_steps={mask2former_steps}"],
    }


def _teacher(cache: Path, recipe: list[str], user: list[str]) -> Path:
    """Train the softmax teacher once (classification on the pretraining split) and keep its backbone.

    The cache key is what determines the teacher's weights (model, stage, data, seed, steps, precision), so
    overrides such as ``train.progress`` reuse it. A second demo that finds the teacher being trained waits for
    it; a teacher run that was killed continues from its checkpoint."""
    from adala.engine.rundir import cache_entry_lock

    cfg = compose(["stage=finetune_cls", *without_attention(user), *recipe])
    train = cfg.train
    key = _digest([dataclasses.asdict(cfg.model), cfg.attention, *map(dataclasses.asdict, (cfg.stage, cfg.data))]
                  + [train.seed, train.max_steps, train.precision])
    path = cache / f"teacher-{key}.safetensors"
    with cache_entry_lock(cache / f".teacher-{key}.lock", f"the demo teacher {path}"):
        if path.is_file():
            log.info("using the cached demo teacher %s", path)
            return path
        cfg.run_dir, cfg.resume, cfg.overwrite = str(cache / f"teacher-{key}-run"), "auto", False
        result = run_stage(cfg)
        # Keep the backbone only: every variant's Stage 3 starts from a fresh head.
        metadata = read_export_metadata(result.export)
        state = {k: v for k, v in read_state_dict(result.export).items() if not k.startswith("head.")}
        save_export(state, path, {**metadata, "num_classes": 0, "stage": "demo_teacher",
                                  "pretrain_top1": result.metrics["top1"]})
    return path


def _cache_dir(configured: Optional[str]) -> Path:
    return Path(configured or os.environ.get("ADALA_CACHE") or Path.home() / ".cache" / "adala")


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
