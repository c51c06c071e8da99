"""The attention comparison (paper Tables 1–2) as jobs of the pipelines' graph: one model × many attentions.

Every attention plug goes through two protocols, each its own Stage-3 variant of :func:`adala.launch.pipeline.plan`
(run under ``<root>/<attention>/``):

- ``baseline``, the paper's protocol for it (App. A.2): the teacher linearized with the plug and fine-tuned
  (Stage 3 only); a plug that brings its own alignment objective (Hedgehog: attention scores, LoLCATS: per-head
  outputs) first runs Stage 1 with it, and LoLCATS fine-tunes classification with LoRA (rank 8, alpha 16);
- ``adala``: Stage 1 → Stage 2 → Stage 3 with the plug.

The softmax teacher fine-tuned alone (Stage 3 only) is the reference row. Where each job starts and what it
trains is the graph's: the demo and the cluster pipelines run the same jobs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from adala.attention import get_plug
from adala.config import compose
from adala.errors import UserError
from adala.launch.pipeline import MAIN_VARIANT, VARIANTS, Job, Variant, plan

TABLE1_ATTENTIONS = ("elu1", "monarch", "nystrom", "performer", "cosformer", "linformer", "lolcats", "hedgehog")
BASELINE = "baseline"
REFERENCE = "teacher"  # the softmax teacher, Stage 3 only
BASELINE_LORA = {"lolcats": ("stage.lora=8", "stage.lora_alpha=16")}  # the plugs whose recipe fine-tunes with LoRA
LORA_STAGE = "finetune_cls"  # the Stage-3 stage that takes LoRA


def own_objective(attention: str) -> Optional[str]:
    """The Stage-1 objective a plug brings (Hedgehog, LoLCATS), None for AdaLA's (``output``)."""
    kind = compose([f"attention={attention}"]).attention["kind"]
    objective = get_plug(kind).stage1_objective
    return None if objective == "output" else objective


def baseline_variant(attention: str) -> Variant:
    """The paper's protocol for ``attention`` as a Stage-3 variant (starting from Stage 1 or from the weights)."""
    objective = own_objective(attention)
    if objective is None:
        return Variant(f"{attention}: teacher linearized, Stage 3 only", "weights")
    return Variant(f"{attention}: Stage 1 ({objective}) + Stage 3", "s1")


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
    overrides: Sequence[str] = (),
    demo: bool = False,
    teacher: Optional[str | Path] = None,
) -> dict[str, list[Job]]:
    """The jobs of every attention's protocols under ``root/<attention>``, and the softmax reference under
    ``root/softmax``; keyed by attention ("softmax" for the reference), each list in a valid order to run."""
    check_attentions(attentions)
    if demo and teacher is None:
        raise ValueError("the comparison's demo jobs start from one teacher trained before them")
    root = Path(root)
    reference = plan([model], root / "softmax", overrides=overrides, demo=demo, teacher=teacher,
                     variants={REFERENCE: VARIANTS[REFERENCE]})
    jobs = {"softmax": [job for job in reference if job.variant == REFERENCE]}
    for attention in attentions:
        planned = plan([model], root / attention, overrides=[*overrides, f"attention={attention}"], demo=demo,
                       teacher=teacher, variants={MAIN_VARIANT: VARIANTS[MAIN_VARIANT],
                                                  BASELINE: baseline_variant(attention)})
        for job in planned:
            if job.variant == BASELINE and job.stage == LORA_STAGE:
                job.overrides.extend(BASELINE_LORA.get(attention, ()))
        jobs[attention] = planned
    return jobs
