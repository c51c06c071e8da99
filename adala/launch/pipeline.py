"""One model's pipeline as a graph of stage jobs: [teacher →] Stage 1 → Stage 2 → Stage-3 tasks fanned out.

Every job is an ordinary ``python -m adala`` run: a list of Hydra overrides and a run directory of its own, with
``resume=auto`` so a requeued or retried job continues from its latest complete checkpoint. A job starts from the
export of the one before it (``stage.init``). Each stage reads its own data set unless told otherwise (Stage 1
COCO, Stage 2 ImageNet-22K: ``conf/stage/*.yaml``); a Stage-3 task names its data set. With ``ablation`` the graph
also holds the paper's Table-3 ablation: Stage 2 without Stage 1, and every Stage-3 task from each start in
:data:`VARIANTS`. The built-in demo (``python -m adala``) runs this graph in process.

User overrides apply to every job unless scoped: ``SCOPE:key=value`` applies only to the jobs of one model
(``dinov2_l:model.weights=...``) or one step (``s1:``, ``s2:``, ``s3:`` for all Stage-3 jobs, a task's name such
as ``ade20k:``, or ``teacher:`` in the demo); ``MODEL:STEP:key=value`` to one step of one model
(``dinov2_l:s2:train.max_steps=1000``). An override with more scopes wins over one with fewer; otherwise the
later one on the line wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from adala.config import Config, compose, override, without_attention
from adala.errors import UserError
from adala.models import list_vfms
from adala.run import EXPORT_NAME


@dataclass(frozen=True)
class Task:
    """A Stage-3 task: the stage that trains it, the data config it reads and what else makes it (e.g. its head)."""

    stage: str
    data: str
    overrides: tuple[str, ...] = ()  # applied before the user's, so scoped overrides (``TASK:key=value``) win


@dataclass(frozen=True)
class Variant:
    """Where the Stage-3 tasks of one row of the ablation (paper Table 3) start."""

    description: str
    start: Optional[str]  # a step (its export), "weights" (the model's, i.e. the teacher's), None: random weights
    overrides: tuple[str, ...] = ()  # what else makes the variant; applied after the user's overrides


TASKS = {
    "in1k": Task("finetune_cls", "in1k"),
    "ade20k": Task("finetune_seg", "ade20k"),
    "cityscapes": Task("finetune_seg", "cityscapes"),
}
DEFAULT_MODELS = ("dinov2_l", "clip_l", "siglip_l", "vit_l_in1k")
DEFAULT_TASKS = ("in1k", "ade20k", "cityscapes")
# A Mask2Former head sized for the demo model (64 wide, 8×8 tokens, 13 mask classes).
DEMO_MASK2FORMER = ("stage.head=mask2former", "stage.mask2former.hidden_dim=64", "stage.mask2former.num_queries=16",
                    "stage.mask2former.decoder_layers=3", "stage.mask2former.encoder_layers=1",
                    "stage.mask2former.feedforward=256", "stage.mask2former.train_points=1024")
DEMO_TASKS = {"cls": Task("finetune_cls", "demo"), "seg": Task("finetune_seg", "demo"),
              "mask2former": Task("finetune_seg", "demo", DEMO_MASK2FORMER)}
DEFAULT_DEMO_TASKS = ("cls", "seg")
DEMO_MODELS = ("demo_tiny", "demo_small")
STEPS = ("teacher", "s1", "s2", "s3")  # the step scopes; a task's name scopes its Stage-3 jobs
S2_WITHOUT_S1 = "s2_without_s1"  # the ablation's Stage 2 from the linearized teacher (scope: s2)
MAIN_VARIANT = "adala"  # the pipeline's own Stage 3; its jobs are named after their task alone
VARIANTS = {
    "teacher": Variant("softmax teacher, Stage 3 only", "weights", ("attention=softmax",)),
    "adala": Variant("Stage 1 + 2 + 3 (ViT-AdaLA)", "s2"),
    "s2_s3": Variant("Stage 2 + 3 (no attention alignment)", S2_WITHOUT_S1),
    "s1_s3": Variant("Stage 1 + 3 (no feature alignment)", "s1"),
    "s3_only": Variant("teacher linearized, Stage 3 only", "weights"),
    "scratch_linear": Variant("linear ViT from scratch, Stage 3 only", None, ("model.weights=null",)),
}


@dataclass
class Job:
    """One stage run of one model's pipeline."""

    model: str
    step: str  # unique in a model's pipeline: teacher | s1 | s2 | s2_without_s1 | a task | VARIANT_task
    stage: str
    run_dir: Path
    overrides: list[str]
    after: list["Job"] = field(default_factory=list)
    task: Optional[str] = None  # Stage 3: the task it trains
    variant: Optional[str] = None  # Stage 3: its row of the ablation
    attention: Optional[str] = None  # the plug of an attention comparison's job; None: the model's own pipeline

    @property
    def pipeline(self) -> str:
        """The pipeline the job belongs to: its model's, or one attention's of a model in a comparison."""
        return self.model if self.attention is None else f"{self.model}/{self.attention}"

    @property
    def name(self) -> str:
        return f"{self.pipeline}/{self.step}"

    @property
    def export(self) -> Path:
        return self.run_dir / "export" / EXPORT_NAME


Scoped = list[tuple[frozenset[str], str]]


def split_scoped(overrides: Sequence[str], *, models: Sequence[str], steps: Sequence[str]) -> tuple[list[str], Scoped]:
    """Separate scoped overrides (``SCOPE:key=value``, ``MODEL:STEP:key=value``) from the ones for every job.

    Returns the common ones and ``(scopes, key=value)`` pairs, fewer scopes first, otherwise in the given order,
    so the more specific and then the later override wins. An unknown scope, or two models or two steps in one
    override, is an error.
    """
    common: list[str] = []
    scoped: Scoped = []
    for item in overrides:
        *scopes, _ = item.split("=", 1)[0].split(":")
        if not scopes:
            common.append(item)
            continue
        for scope in scopes:
            if scope not in models and scope not in steps:
                raise UserError(f"unknown scope {scope!r} in {item!r}; scope an override with one of: "
                                f"{', '.join([*models, *steps])} (or MODEL:STEP: for one step of one model)")
        if sum(s in models for s in scopes) > 1 or sum(s in steps for s in scopes) > 1:
            raise UserError(f"{item!r}: no job has all of the scopes {', '.join(scopes)}; combine at most one model "
                            f"and one step, e.g. {models[0]}:s2:key=value")
        scoped.append((frozenset(scopes), item[len(":".join(scopes)) + 1:]))
    scoped.sort(key=lambda entry: len(entry[0]))
    return common, scoped


def plan(
    models: Sequence[str],
    root: str | Path,
    *,
    tasks: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    demo: bool = False,
    ablation: bool = False,
    teacher: Optional[str | Path] = None,
    variants: Optional[Mapping[str, Variant]] = None,
) -> list[Job]:
    """The jobs of every model's pipeline, each after the jobs it depends on (a valid order to run them in).

    With ``demo`` the data are the built-in demo's shards (written now, cached), the steps, batch sizes and
    learning rates are the demo's, and each pipeline starts with a job that trains the demo's softmax teacher,
    unless ``teacher`` names weights of one already trained. ``ablation`` adds Stage 2 without Stage 1 and the
    Stage-3 tasks of every variant in :data:`VARIANTS`;
    ``variants`` names the Stage-3 variants instead (each starting from a step, the weights or random weights).
    """
    known_tasks = DEMO_TASKS if demo else TASKS
    tasks = list(tasks or (DEFAULT_DEMO_TASKS if demo else DEFAULT_TASKS))
    unknown = [m for m in models if m not in list_vfms()]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; choose from: {', '.join(list_vfms())}")
    if not models:
        raise UserError("no models given; name at least one, e.g. dinov2_l")
    bad = [t for t in tasks if t not in known_tasks]
    if bad:
        raise UserError(f"unknown Stage-3 task {bad[0]!r}; choose from: {', '.join(known_tasks)}")
    if teacher is not None and not demo:
        raise ValueError("teacher weights are the demo's; a pipeline's teacher is model.weights")
    common, scoped = split_scoped(overrides, models=models, steps=[*STEPS, *known_tasks])
    recipe = _demo_recipe(common) if demo else {"align_attention": [], "align_features": [], "finetune": []}
    if variants is None:
        variants = VARIANTS if ablation else {MAIN_VARIANT: VARIANTS[MAIN_VARIANT]}
    root = Path(root)
    jobs: list[Job] = []
    for model in models:

        def job(step: str, stage: str, extra: list[str], after: list[Job], *, scope: str, run_dir: str,
                task: Optional[str] = None, variant: Optional[str] = None, last: Sequence[str] = ()) -> Job:
            path = root / model / run_dir
            scopes = frozenset({model, scope, *(("s3", task) if task else ())})
            user = [*common, *(o for needs, o in scoped if needs <= scopes)]
            if "attention=softmax" in last:  # the user's plug and its settings do not apply to a softmax variant
                user = without_attention(user)
            job_overrides = [f"stage={stage}", f"model={model}", override("run_dir", path), "resume=auto", *extra,
                             *user, *last]
            created = Job(model=model, step=step, stage=stage, run_dir=path, overrides=job_overrides, after=after,
                          task=task, variant=variant)
            jobs.append(created)
            return created

        first: list[Job] = []  # the job that trains the model's weights (the demo's teacher), if any
        weights: list[str] = []  # the demo's teacher as every job's model.weights; a pipeline's are the user's
        if demo:
            if teacher is None:
                trained = job("teacher", "finetune_cls", recipe["teacher"], [], scope="teacher", run_dir="teacher")
                first = [trained]
            weights = [override("model.weights", first[0].export if first else teacher)]
        s1 = job("s1", "align_attention", [*weights, *recipe["align_attention"]], first, scope="s1",
                 run_dir="s1_align_attention")
        s2 = job("s2", "align_features", [*weights, *recipe["align_features"], override("stage.init", s1.export)],
                 [s1], scope="s2", run_dir="s2_align_features")
        exports = {"s1": s1, "s2": s2}  # the steps a Stage-3 variant can start from
        if ablation:
            exports[S2_WITHOUT_S1] = job(S2_WITHOUT_S1, "align_features", [*weights, *recipe["align_features"]],
                                         first, scope="s2", run_dir=S2_WITHOUT_S1)
        for name, variant in variants.items():
            start = exports[variant.start] if variant.start in exports else None
            init = [override("stage.init", start.export)] if start is not None else []
            after = [start] if start is not None else (first if variant.start == "weights" else [])
            for task in tasks:
                spec = known_tasks[task]
                step = task if name == MAIN_VARIANT else f"{name}_{task}"
                job(step, spec.stage, [f"data={spec.data}", *spec.overrides, *weights, *recipe["finetune"],
                                       *recipe.get(task, []), *init],
                    after, scope=task, run_dir=f"s3_{step}", task=task, variant=name, last=variant.overrides)
    return jobs


def validate_jobs(jobs: Sequence[Job], *, world_size: int) -> list[Config]:
    """Compose and validate every job before anything starts; the exports of earlier jobs may not exist yet.

    Models without teacher weights are named together first, with the scoped override that gives them.
    """
    from adala.run import ALIGNMENT_STAGES, validate

    configs = [compose(job.overrides) for job in jobs]
    missing = list(dict.fromkeys(job.model for job, cfg in zip(jobs, configs)
                                 if job.stage in ALIGNMENT_STAGES and cfg.model.weights is None))
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


def job_table(jobs: Sequence[Job], columns: Mapping[str, Callable[[Job], str]] = {}) -> str:
    """The job graph as a table: each job's name, stage, the jobs it waits for, ``columns`` and its run directory."""
    header = ["job", "stage", "after", *columns, "run_dir"]
    rows = [[job.name, job.stage, ",".join(a.name for a in job.after) or "-", *(f(job) for f in columns.values()),
             str(job.run_dir)] for job in jobs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in [header, *rows])
