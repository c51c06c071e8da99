"""A sweep's results, one row per pipeline (a model's, or one attention's of a model in an attention comparison):
the final loss of every stage, Stage-3 top-1 / mIoU, and the status.

Everything is read back from the run directories (``log.jsonl``, ``metrics.json``), so a table can be rebuilt
from a sweep's root at any time; ``results.md`` and ``results.json`` are written atomically.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from adala.launch.pipeline import Job
from adala.files import write_text_atomic

METRIC_OF_STAGE = {"finetune_cls": "top1", "finetune_seg": "miou"}
METRIC_TITLES = {"top1": "top-1", "miou": "mIoU"}


@dataclass
class ModelResult:
    model: str
    status: str  # "completed", or "failed: <job>: <why>"
    attention: Optional[str] = None  # the plug of an attention comparison's pipeline
    losses: dict[str, Optional[float]] = field(default_factory=dict)  # step -> final loss
    metrics: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)  # Stage-3 task -> {metric: value}


def final_loss(run_dir: Path) -> Optional[float]:
    """The last ``loss`` in a run's ``log.jsonl`` (None before any step was logged)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return None
    loss = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record.get("loss"), (int, float)):
            loss = float(record["loss"])
    return loss


def task_metric(job: Job) -> dict[str, Optional[float]]:
    """A Stage-3 job's evaluation metric from its ``metrics.json`` (None until the job has evaluated)."""
    name = METRIC_OF_STAGE[job.stage]
    path = job.run_dir / "metrics.json"
    value = json.loads(path.read_text()).get(name) if path.is_file() else None
    return {name: None if value is None else float(value)}


def collect(jobs: Sequence[Job], statuses: Mapping[str, str]) -> list[ModelResult]:
    """One result per pipeline (:attr:`Job.pipeline`), in the order of ``jobs``; ``statuses`` maps a pipeline to
    its status line."""
    results: dict[str, ModelResult] = {}
    for job in jobs:
        result = results.setdefault(job.pipeline, ModelResult(job.model, statuses.get(job.pipeline, "not run"),
                                                              job.attention))
        result.losses[job.step] = final_loss(job.run_dir)
        if job.task is not None:  # a Stage-3 task (the demo's teacher is evaluated too, but is no result)
            result.metrics[job.step] = task_metric(job)
    return list(results.values())


def markdown_table(results: Sequence[ModelResult]) -> str:
    """A markdown table: one row per pipeline, a column per stage's final loss and per Stage-3 metric (and the
    attention, for a comparison's pipelines)."""
    steps = list(dict.fromkeys(step for r in results for step in r.losses))
    metrics = list(dict.fromkeys((task, name) for r in results for task, names in r.metrics.items() for name in names))
    attention = any(r.attention is not None for r in results)
    header = ["VFM", *(["attention"] if attention else []), *(f"{step} loss" for step in steps),
              *(f"{task} {METRIC_TITLES[name]}" for task, name in metrics), "status"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * (1 + attention) + "---:|" * (len(steps) + len(metrics)) + "---|"]
    for r in results:
        cells = [f"`{r.model}`", *([r.attention or "–"] if attention else []),
                 *(_loss(r.losses.get(step)) for step in steps),
                 *(_percent(r.metrics.get(task, {}).get(name)) for task, name in metrics), r.status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(root: Path, results: Sequence[ModelResult]) -> tuple[Path, Path]:
    """Write ``<root>/results.md`` and ``<root>/results.json``, each to a temporary name first, then renamed."""
    root.mkdir(parents=True, exist_ok=True)
    table = root / "results.md"
    data = root / "results.json"
    write_text_atomic(table, markdown_table(results))
    write_text_atomic(data, json.dumps({"models": [asdict(r) for r in results]}, indent=2) + "\n")
    return table, data


def _loss(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4g}"


def _percent(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"
