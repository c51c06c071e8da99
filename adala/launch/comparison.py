"""The attention comparison (paper Tables 1–2) as jobs of the pipelines' graph: one model × many attentions.

Every attention plug goes through two protocols, each its own Stage-3 variant of :func:`adala.launch.pipeline.plan`
(run under ``<root>/<attention>/``):

- ``baseline``, the paper's protocol for it (App. A.2): the teacher linearized with the plug and fine-tuned
  (Stage 3 only); a plug that brings its own alignment objective (Hedgehog: attention scores, LoLCATS: per-head
  outputs) first runs Stage 1 with it; the stages after it follow the plug's recipe (LoLCATS: LoRA rank 8, α 16,
  which validation switches on, :func:`adala.run.validate`);
- ``adala``: Stage 1 → Stage 2 → Stage 3 with the plug, Stages 2 and 3 trained in full (a plug's LoRA recipe off).

The softmax teacher fine-tuned alone (Stage 3 only) is the reference row. Where each job starts and what it
trains is the graph's: the demo and the cluster pipelines run the same jobs. A launcher (``--attentions``) runs the
flattened plan (:func:`comparison_jobs`) and leaves :data:`RECORD` in its root, from which
:func:`read_record` gives the plan back to the report (``adala compare --runs ROOT``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from adala.attention import AttentionPlug, get_plug
from adala.config import compose
from adala.errors import UserError
from adala.files import write_text_atomic
from adala.launch.pipeline import MAIN_VARIANT, VARIANTS, Job, Variant, plan
from adala.run import LORA_STAGES

TABLE1_ATTENTIONS = ("elu1", "monarch", "nystrom", "performer", "cosformer", "linformer", "lolcats", "hedgehog")
BASELINE = "baseline"
REFERENCE = "teacher"  # the softmax teacher, Stage 3 only
IN_FULL = "stage.lora=0"  # AdaLA's Stages 2 and 3 for a plug whose recipe would train LoRA adapters instead
RECORD = "comparison.json"  # a launcher's comparison plan, in its root


def own_objective(attention: str) -> Optional[str]:
    """The Stage-1 objective a plug brings (Hedgehog, LoLCATS), None for AdaLA's (``output``)."""
    objective = _plug(attention).stage1_objective
    return None if objective == "output" else objective


def _plug(attention: str) -> type[AttentionPlug]:
    """The plug class of the attention config ``attention``."""
    return get_plug(compose([f"attention={attention}"]).attention["kind"])


def baseline_variant(attention: str) -> Variant:
    """The paper's protocol for ``attention`` as a Stage-3 variant (starting from Stage 1 or from the weights)."""
    objective = own_objective(attention)
    if objective is None:
        return Variant(f"{attention}: teacher linearized, Stage 3 only", "weights")
    return Variant(f"{attention}: Stage 1 ({objective}) + Stage 3", "s1")


def attention_list(text: str) -> list[str]:
    """``--attentions a,b,...`` as names (checked by :func:`check_attentions`)."""
    return [name for name in text.split(",") if name]


def check_attentions(attentions: Sequence[str]) -> None:
    """Refuse an empty list, an unknown attention config or softmax (the reference row is always there)."""
    if not attentions:
        raise UserError("--attentions: name at least one plug, e.g. --attentions elu1,performer")
    for attention in attentions:
        try:
            kind = compose([f"attention={attention}"]).attention["kind"]
        except UserError as err:
            raise UserError(f"--attentions: {err}") from None
        if kind == "softmax":
            raise UserError("--attentions: softmax is the reference row already; name only linear plugs")


def plan_comparison(
    model: str,
    attentions: Sequence[str],
    root: str | Path,
    *,
    tasks: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    demo: bool = False,
    teacher: Optional[str | Path] = None,
) -> dict[str, list[Job]]:
    """The jobs of every attention's protocols under ``root/<attention>``, and the softmax reference under
    ``root/softmax``; keyed by attention ("softmax" for the reference), each list in a valid order to run, every
    job tagged with its attention. A demo without ``teacher`` trains one first (the reference's ``teacher`` job),
    which every attention's first jobs wait for."""
    check_attentions(attentions)
    root = Path(root)
    reference = plan([model], root / "softmax", tasks=tasks, overrides=overrides, demo=demo, teacher=teacher,
                     variants={REFERENCE: VARIANTS[REFERENCE]})
    trained = [job for job in reference if job.step == "teacher"]  # the demo's teacher job, when it trains one
    if trained:
        teacher = trained[0].export
    jobs = {"softmax": [job for job in reference if job.variant == REFERENCE or job in trained]}
    for attention in attentions:
        planned = plan([model], root / attention, tasks=tasks, overrides=[*overrides, f"attention={attention}"],
                       demo=demo, teacher=teacher, variants={MAIN_VARIANT: VARIANTS[MAIN_VARIANT],
                                                             BASELINE: baseline_variant(attention)})
        in_full = _plug(attention).finetune_lora is not None  # AdaLA's stages keep training in full
        for job in planned:
            if in_full and job.variant != BASELINE and job.stage in LORA_STAGES:
                job.overrides.append(IN_FULL)
            if not job.after:
                job.after = list(trained)
        jobs[attention] = planned
    for attention, planned in jobs.items():
        for job in planned:
            job.attention = attention
    return jobs


def plan_launch(models: Sequence[str], attentions: Sequence[str], root: Path, *, tasks: Optional[Sequence[str]],
                overrides: Sequence[str], demo: bool) -> dict[str, list[Job]]:
    """A launcher's ``--attentions``: the comparison on its one model (``models``: the launcher's list)."""
    check_attentions(attentions)
    if len(models) != 1:
        raise UserError(f"--attentions compares the attentions on one model, not {len(models)} "
                        f"({', '.join(models)}); name it with --models, e.g. --models {models[0]}")
    return plan_comparison(models[0], attentions, root, tasks=tasks, overrides=overrides, demo=demo)


def comparison_jobs(planned: dict[str, list[Job]]) -> list[Job]:
    """The plan as one list in a valid order to run (the reference, with the demo's teacher, first)."""
    return [job for jobs in planned.values() for job in jobs]


def write_record(root: Path, jobs: Sequence[Job]) -> Path:
    """Leave the plan (:func:`comparison_jobs`) in ``root`` (atomically): what the report of the finished runs reads
    back, with the softmax teacher every student is compared with (the reference's ``model.weights``: the demo's
    teacher or the user's)."""
    teacher = compose(next(j for j in jobs if j.attention == "softmax" and j.variant).overrides).model.weights
    attentions = list(dict.fromkeys(j.attention for j in jobs if j.attention != "softmax"))
    record = {"teacher": str(teacher), "attentions": attentions,
              "jobs": [{"model": j.model, "attention": j.attention, "step": j.step, "stage": j.stage,
                        "run_dir": str(j.run_dir), "task": j.task, "variant": j.variant} for j in jobs]}
    path = Path(root) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def read_record(root: str | Path) -> tuple[dict[str, list[Job]], Path]:
    """The plan a launcher left in ``root`` (its jobs without overrides) and the teacher's weights."""
    path = Path(root) / RECORD
    if not path.is_file():
        raise UserError(f"{root} holds no attention comparison ({RECORD} not found); give the --root of a launcher "
                        "run with --attentions")
    record = json.loads(path.read_text())
    planned: dict[str, list[Job]] = {}
    for entry in record["jobs"]:
        job = Job(overrides=[], **{**entry, "run_dir": Path(entry["run_dir"])})
        planned.setdefault(job.attention, []).append(job)
    return planned, Path(record["teacher"])
