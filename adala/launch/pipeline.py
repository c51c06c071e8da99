"""One model's pipeline as a graph of stage jobs: [teacher →] Stage 1 → Stage 2 → Stage-3 tasks fanned out.

Every job is an ordinary ``python -m adala`` run: a list of Hydra overrides and a run directory of its own, with
``resume=auto`` so a requeued or retried job continues from its latest complete checkpoint. A job starts from the
export of the one before it (``stage.init``).

User overrides apply to every job unless scoped: ``SCOPE:key=value`` applies only to the jobs of one model
(``dinov2_l:model.weights=...``) or one step (``s1:``, ``s2:``, ``s3:`` for all Stage-3 tasks, a task's name such
as ``ade20k:``, or ``teacher:`` in the demo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from adala.config import Config, compose, override
from adala.errors import UserError
from adala.models import list_vfms
from adala.run import EXPORT_NAME


@dataclass(frozen=True)
class Task:
    """A Stage-3 task: the stage that trains it and the data config it reads."""

    stage: str
    data: str


TASKS = {
    "in1k": Task("finetune_cls", "in1k"),
    "ade20k": Task("finetune_seg", "ade20k"),
    "cityscapes": Task("finetune_seg", "cityscapes"),
}
DEFAULT_MODELS = ("dinov2_l", "clip_l", "siglip_l", "vit_l_in1k")
DEFAULT_TASKS = ("in1k", "ade20k", "cityscapes")
DEMO_TASKS = {"cls": Task("finetune_cls", "demo"), "seg": Task("finetune_seg", "demo")}
DEMO_MODELS = ("demo_tiny", "demo_small")
STEPS = ("teacher", "s1", "s2", "s3")


@dataclass
class Job:
    """One stage run of one model's pipeline."""

    model: str
    step: str  # teacher | s1 | s2 | a task name
    stage: str
    run_dir: Path
    overrides: list[str]
    after: list["Job"] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.step}"

    @property
    def export(self) -> Path:
        return self.run_dir / "export" / EXPORT_NAME


def split_scoped(overrides: Sequence[str], scopes: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Separate ``SCOPE:key=value`` overrides from the ones for every job; an unknown scope is an error."""
    common: list[str] = []
    scoped: dict[str, list[str]] = {}
    for item in overrides:
        key = item.split("=", 1)[0]
        if ":" not in key:
            common.append(item)
            continue
        scope, rest = item.split(":", 1)
        if scope not in scopes:
            raise UserError(f"unknown scope {scope!r} in {item!r}; scope an override with one of: {', '.join(scopes)}")
        scoped.setdefault(scope, []).append(rest)
    return common, scoped


def plan(
    models: Sequence[str],
    root: str | Path,
    *,
    tasks: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    pretrain_data: str = "in22k",
    demo: bool = False,
) -> list[Job]:
    """The jobs of every model's pipeline, each after the jobs it depends on (a valid submission order).

    With ``demo`` the data are the built-in demo's shards (written now, cached) and each pipeline starts with a
    job that trains the demo's softmax teacher; the steps, batch sizes and learning rates are the demo's.
    """
    known_tasks = DEMO_TASKS if demo else TASKS
    tasks = list(tasks or (DEMO_TASKS if demo else DEFAULT_TASKS))
    unknown = [m for m in models if m not in list_vfms()]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; choose from: {', '.join(list_vfms())}")
    if not models:
        raise UserError("no models given; name at least one, e.g. dinov2_l")
    bad = [t for t in tasks if t not in known_tasks]
    if bad:
        raise UserError(f"unknown Stage-3 task {bad[0]!r}; choose from: {', '.join(known_tasks)}")
    common, scoped = split_scoped(overrides, [*models, *STEPS, *known_tasks])
    recipe = _demo_recipe(common) if demo else {"align_attention": [], "align_features": [], "finetune": []}
    root = Path(root)
    jobs: list[Job] = []
    for model in models:

        def job(step: str, stage: str, run_dir: str, extra: list[str], after: list[Job]) -> Job:
            path = root / model / run_dir
            scopes = [model, step] + (["s3"] if step in known_tasks else [])
            job_overrides = [f"stage={stage}", f"model={model}", override("run_dir", path), "resume=auto", *extra,
                             *common, *(o for scope in scopes for o in scoped.get(scope, []))]
            created = Job(model=model, step=step, stage=stage, run_dir=path, overrides=job_overrides, after=after)
            jobs.append(created)
            return created

        first: list[Job] = []
        pretrain = [f"data={'demo' if demo else pretrain_data}"]
        if demo:
            teacher = job("teacher", "finetune_cls", "teacher", ["data=demo", *recipe["teacher"]], [])
            first = [teacher]
            pretrain.append(override("model.weights", teacher.export))
        s1 = job("s1", "align_attention", "s1_align_attention", [*pretrain, *recipe["align_attention"]], first)
        s2 = job("s2", "align_features", "s2_align_features",
                 [*pretrain, *recipe["align_features"], override("stage.init", s1.export)], [s1])
        for task in tasks:
            spec = known_tasks[task]
            job(task, spec.stage, f"s3_{task}",
                [f"data={spec.data}", *recipe["finetune"], override("stage.init", s2.export)], [s2])
    return jobs


def validate_jobs(jobs: Sequence[Job], *, world_size: int) -> list[Config]:
    """Compose and validate every job before anything starts; the exports of earlier jobs may not exist yet.

    Models without teacher weights are named together first, with the scoped override that gives them.
    """
    from adala.run import NEEDS_TEACHER_WEIGHTS, validate

    configs = [compose(job.overrides) for job in jobs]
    missing = list(dict.fromkeys(job.model for job, cfg in zip(jobs, configs)
                                 if job.stage in NEEDS_TEACHER_WEIGHTS and cfg.model.weights is None))
    if missing:
        raise UserError(f"no pretrained weights for {', '.join(missing)}: give each model its weights as "
                        f"MODEL:model.weights=PATH (e.g. {missing[0]}:model.weights=/weights/{missing[0]}.pth), "
                        "or run the built-in demo with --demo")
    pending = {str(j.export) for j in jobs}
    for job, cfg in zip(jobs, configs):
        try:
            validate(cfg, world_size=world_size, pending=pending)
        except UserError as err:
            raise UserError(f"{job.name}: {err}") from None
    return configs


def _demo_recipe(common: Sequence[str]) -> dict[str, list[str]]:
    """The demo's per-step overrides, with its sizes from the ``demo.*`` overrides; writes the demo shards."""
    from adala.demo import demo_recipe, demo_shards

    demo = compose([o for o in common if o.startswith("demo.")]).demo
    shards, _ = demo_shards(demo)
    return demo_recipe(demo, shards)
