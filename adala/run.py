"""Run one stage from a validated config: build its parts, stream its data, fit, export, evaluate."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Optional

from adala.config import Config, StageConfig, to_yaml
from adala.errors import UserError
from adala.models import check_img_size, model_spec, normalise_attention

if TYPE_CHECKING:
    from adala.data.pipeline import DataPlan

log = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"
BEST_EXPORT_NAME = "best.safetensors"  # train.eval_every: the evaluated model with the best metric so far
# Stages 1-2 align a linear-attention student to the pretrained softmax teacher: they need its weights, and
# attention=softmax contradicts them.
ALIGNMENT_STAGES = ("align_attention", "align_features")
LORA_STAGES = ("align_features", "finetune_cls", "finetune_seg")  # stages that take stage.lora (adala.models.lora)
LORA_ALPHA = 16.0  # stage.lora_alpha when neither the user nor the plug's recipe sets it
NEEDS_LABELS = {"finetune_cls": "num_classes", "finetune_seg": "num_seg_classes"}


@dataclass
class StageResult:
    run_dir: Path
    export: Path
    steps: int
    metrics: dict[str, float]


def validate(cfg: Config, *, world_size: Optional[int] = None, pending: Collection[str] = ()) -> Config:
    """Check everything a user can get wrong before any model is built; fills in derived defaults.

    ``world_size`` is the number of processes the run will have (default: this launch's). ``pending`` names
    files that an earlier job of a pipeline will write (a Stage-1 export that Stage 2 starts from): they are
    not required to exist yet.
    """
    return validate_run(cfg, world_size=world_size, pending=pending).cfg


@dataclass(frozen=True)
class ValidRun:
    """A validated config with what validation resolved for it, passed down so that nothing is decided twice."""

    cfg: Config
    data: DataPlan
    attention: dict[str, Any]  # the trained model's spec (adala.models.spec): {"kind": "softmax"} or a plug's


def validate_run(cfg: Config, *, world_size: Optional[int] = None, pending: Collection[str] = ()) -> ValidRun:
    """:func:`validate`, returning the data plan and the normalised attention as well."""
    from adala.data.pipeline import check_data
    from adala.data.transforms import TRANSFORMS
    from adala.engine.distributed import launched_world_size
    from adala.engine.optim import SCHEDULES
    from adala.engine.strategies import check_strategy
    from adala.stages import get_stage

    stage = _require_stage(cfg)
    module = get_stage(stage.name)
    spec = model_spec(cfg.model)  # the composed entry with the user's overrides; null fields from timm
    cfg.model.img_size = cfg.model.img_size or cfg.data.crop_size or spec.native_img_size  # a seg data set's crop
    check_img_size(spec, cfg.model.img_size)
    attention = _attention(cfg, stage)
    if hasattr(module, "check"):  # what only this stage reads
        module.check(cfg, attention)
    if stage.task_model and stage.name not in ALIGNMENT_STAGES:
        raise UserError(f"stage.task_model=true adapts a task model in Stages 1-2 ({', '.join(ALIGNMENT_STAGES)}); "
                        f"stage {stage.name} fine-tunes one already: drop stage.task_model")
    if stage.objective is not None and not hasattr(module, "objective_of"):
        raise UserError(f"stage.objective={stage.objective} applies to stage=align_attention only; drop it")
    _resolve_lora(stage, attention)
    if stage.lora < 0 or (stage.lora and stage.name not in LORA_STAGES):
        raise UserError(f"stage.lora={stage.lora}: LoRA takes a positive rank and applies to stages "
                        f"{', '.join(LORA_STAGES)}; drop it or use e.g. stage.lora=8")
    for key, path in (("model.weights", cfg.model.weights), ("stage.init", stage.init)):
        if path is not None and path not in pending and not os.path.isfile(path):
            raise UserError(f"{key}={path}: file not found; point it at a weight file or an adala export")
    if stage.name in ALIGNMENT_STAGES and cfg.model.weights is None:
        raise UserError(f"stage {stage.name} aligns to a pretrained teacher; set model.weights=PATH to its weights")
    if stage.name in NEEDS_LABELS and getattr(cfg.data, NEEDS_LABELS[stage.name]) <= 0:
        raise UserError(f"stage {stage.name} needs data.{NEEDS_LABELS[stage.name]}; pick a labelled data= config")
    if stage.optim.schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {stage.optim.schedule!r}; use stage.optim.schedule={' or '.join(SCHEDULES)}")
    for key, name in (("transform", cfg.data.train_transform or stage.transform), ("eval_transform", cfg.data.eval_transform)):
        if name not in TRANSFORMS:
            raise UserError(f"unknown {key} {name!r}; use one of {', '.join(TRANSFORMS)}")
    if stage.batch_size <= 0:
        raise UserError(f"stage.batch_size must be positive, got {stage.batch_size}")
    trainable = getattr(module, "TRAINABLE", None)  # which parameters train: only Stage 2 has the choice
    if stage.trainable not in (trainable or (None,)):
        raise UserError(f"stage.trainable={stage.trainable}: " + (f"use {' or '.join(trainable)}" if trainable else
                        f"stage {stage.name} has no such choice (align_features has); drop it"))
    if stage.trainable == "qkv" and stage.lora:
        raise UserError("stage.trainable=qkv and stage.lora both choose what trains; drop one of them")
    world_size = world_size or launched_world_size()
    check_strategy(cfg.strategy, precision=cfg.train.precision, device=cfg.train.device)
    data = check_data(cfg.data, mode=module.STREAM, world_size=world_size, batch_size=stage.batch_size)
    if stage.epochs is None and stage.name == "align_features":
        stage.epochs = cfg.model.align_features_epochs  # the paper's Stage-2 epochs for this model
    if cfg.train.max_steps is None:
        if stage.epochs is None or data.train_samples is None:
            raise UserError("set train.max_steps, or stage.epochs and data.train_samples (the shards' manifest, "
                            "written by `python -m adala.data write`, gives it)")
        global_batch = stage.batch_size * world_size  # stage.batch_size is per rank (per GPU)
        cfg.train.max_steps = max(1, math.ceil(stage.epochs * data.train_samples / global_batch))
    if cfg.train.max_steps <= 0:
        raise UserError(f"train.max_steps must be positive, got {cfg.train.max_steps}")
    cfg.run_dir = cfg.run_dir or f"runs/{stage.name}-{cfg.model.name}"
    _check_run(cfg, world_size)
    return ValidRun(cfg=cfg, data=data, attention=attention)


def _attention(cfg: Config, stage: StageConfig) -> dict[str, Any]:
    """The attention of the model a stage trains, normalised; a choice that contradicts the stage is refused."""
    attention = normalise_attention(cfg.attention)
    if attention["kind"] == "softmax" and stage.name in ALIGNMENT_STAGES:
        raise UserError(f"stage {stage.name} trains linear attention, so attention=softmax contradicts it; "
                        "drop attention=softmax or choose a plug of adala.attention, e.g. attention=linear")
    return attention


def _resolve_lora(stage: StageConfig, attention: dict[str, Any]) -> None:
    """Fill in an unset ``stage.lora`` and ``stage.lora_alpha``: in the stages after attention transfer, the plug's
    recipe (:attr:`~adala.attention.AttentionPlug.finetune_lora`) unless ``stage.trainable=qkv`` chose what trains;
    otherwise no LoRA (α :data:`LORA_ALPHA`)."""
    from adala.attention import get_plug

    recipe = None
    if stage.name in LORA_STAGES and attention["kind"] != "softmax":
        recipe = get_plug(attention["kind"]).finetune_lora
    if stage.lora_alpha is None:
        stage.lora_alpha = recipe[1] if recipe else LORA_ALPHA
    if stage.lora is None:
        stage.lora = recipe[0] if recipe and stage.trainable != "qkv" else 0
        if stage.lora:
            log.info("stage.lora=%d, stage.lora_alpha=%g: LoRA switched on by the recipe of attention=%s "
                     "(stage.lora=0 trains in full)", stage.lora, stage.lora_alpha, attention["kind"])


def _check_run(cfg: Config, world_size: int) -> None:
    """What the run writes and continues from: evaluation and exports while training, the run directory (on the
    main rank, which alone writes it), and the checkpoint to resume from."""
    from adala.engine.rundir import check_run_dir
    from adala.logs import process_rank

    train = cfg.train
    for key in ("eval_every", "export_every"):
        if getattr(train, key) < 0:
            raise UserError(f"train.{key} must be a number of steps, or 0 for none; got {getattr(train, key)}")
    if train.eval_every:
        if cfg.stage.name not in NEEDS_LABELS and not cfg.stage.task_model:  # the labelled stages are evaluated
            raise UserError(f"train.eval_every: stage {cfg.stage.name} has no evaluation metric; only "
                            f"{' and '.join(NEEDS_LABELS)} evaluate, and Stages 1-2 of a task model "
                            "(stage.task_model=true; else drop train.eval_every)")
        if not cfg.data.val:
            raise UserError("train.eval_every evaluates on data.val; set data.val to validation shards")
    if process_rank() == 0:
        check_run_dir(Path(cfg.run_dir), resume=cfg.resume, overwrite=cfg.overwrite)
    _check_resume(cfg, world_size)


def _check_resume(cfg: Config, world_size: int) -> None:
    """A checkpoint to resume from must be complete and readable by this run's stage, strategy and ranks."""
    from adala.engine.checkpoint import check_resumable, resume_point
    from adala.engine.strategies import STRATEGIES

    path = resume_point(Path(cfg.run_dir) / "checkpoints", cfg.resume)
    if path is None:
        return
    strategy = STRATEGIES[cfg.strategy.name]()
    manifest = check_resumable(path, strategy=cfg.strategy.name, checkpoint_format=strategy.checkpoint_format,
                               meta=_run_meta(cfg))
    strategy.check_world_size(path, saved=int(manifest["world_size"]), current=world_size, cfg=cfg.strategy)


def run_stage(cfg: Config, stream: Optional[Iterable[dict[str, Any]]] = None) -> StageResult:
    """Train ``cfg.stage`` (validated first), export its product atomically and evaluate it if it has a val set.

    Runs as one of several processes when launched by torchrun. ``stream`` replaces the configured training
    data with any iterable of batches (it is checkpointed too if it has ``state_dict``/``load_state_dict``).
    The main rank holds the run directory's lock for the whole run.
    """
    from adala.data.pipeline import train_stream
    from adala.data.transforms import build_transform
    from adala.engine import distributed
    from adala.engine.evaluate import evaluate
    from adala.engine.loop import fit
    from adala.engine.rundir import clear_run_dir, lock_run_dir
    from adala.engine.state import seed_everything
    from adala.engine.strategies import build_strategy
    from adala.logs import show_progress
    from adala.stages import get_stage
    from adala.stages.task_model import eval_fields

    run = validate_run(cfg)
    cfg = run.cfg
    stage = _require_stage(cfg)
    strategy = build_strategy(cfg.strategy, device=cfg.train.device, precision=cfg.train.precision, batch_size=stage.batch_size)
    lock = None
    try:
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        module = get_stage(stage.name)
        parts = module.build(cfg, run.attention)  # loads the weights: a file that does not fit fails here, before anything is written
        run_dir = Path(cfg.run_dir)
        lock = lock_run_dir(run_dir, is_main=strategy.is_main)
        if strategy.is_main:
            if cfg.overwrite:
                removed = clear_run_dir(run_dir)
                if removed:
                    log.warning("overwrite=true: removed the earlier run's %s from %s", ", ".join(removed), run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        seed_everything(cfg.train.seed + strategy.rank)  # different augmentations and dropout on each rank
        spec = model_spec(cfg.model)
        if stream is None:
            transform = build_transform(cfg.data.train_transform or stage.transform, img_size=cfg.model.img_size,
                                        mean=spec.mean, std=spec.std, scale=cfg.data.scale,
                                        cat_max_ratio=cfg.data.cat_max_ratio)
            stream = train_stream(run.data, fields=module.FIELDS, mode=module.STREAM, transform=transform,
                                  batch_size=stage.batch_size, seed=cfg.train.seed, rank=strategy.rank,
                                  world_size=strategy.world_size)
        progress = show_progress(cfg.train.progress)
        outputs = _Outputs(run, parts, strategy, fields=eval_fields(cfg) or module.FIELDS, progress=progress)
        trainer = fit(parts, stream, _loop_config(cfg, progress), strategy=strategy, run_dir=run_dir, resume=cfg.resume,
                      periodic=outputs.periodic())
        step = trainer.state.step
        export = outputs.export(trainer.model, EXPORT_NAME, step=step)
        metrics: dict[str, float] = {}
        if parts.metric is not None and run.data.val:
            validation = outputs.validation
            metrics = validation.result_at(step) if validation is not None else None  # evaluated at the last step
            if metrics is None:
                metrics = evaluate(trainer.model, outputs.val_batches(), parts.metric(), strategy=strategy, progress=progress)
            if strategy.is_main:
                best = {"best": validation.best} if validation is not None else {}
                (run_dir / "metrics.json").write_text(json.dumps({"step": step, **metrics, **best}, indent=2) + "\n")
        distributed.barrier()
    finally:
        strategy.close()
        if lock is not None:
            lock.release()
    log.info("%s done after %d steps; export %s%s", stage.name, step, export,
             "".join(f", {k} {v:.4f}" for k, v in metrics.items()))
    return StageResult(run_dir=run_dir, export=export, steps=step, metrics=metrics)


class _Outputs:
    """What a run writes besides checkpoints and logs: exports (the last, periodic ones, the best) and
    evaluations, as the loop's periodic work (``train.eval_every``, ``train.export_every``)."""

    def __init__(self, run: ValidRun, parts: Any, strategy: Any, *, fields: tuple[str, ...], progress: bool) -> None:
        from adala.engine.evaluate import Validation

        self.run, self.parts, self.strategy, self.fields = run, parts, strategy, fields
        self.directory = Path(run.cfg.run_dir) / "export"
        self.validation = None
        if run.cfg.train.eval_every:
            self.validation = Validation(self.val_batches, parts.metric, strategy=strategy, progress=progress,
                                         keep_best=lambda model, best: self.export(model, BEST_EXPORT_NAME, **best))

    def export(self, model: Any, name: str, **metadata: Any) -> Path:
        """Write ``export/<name>`` with ``metadata`` (a collective: every rank gathers its shards, rank 0 writes)."""
        state = self.strategy.full_state_dict(model)
        path = self.directory / name
        if self.strategy.is_main:
            self.parts.export(state, path, **metadata)
        return path

    def val_batches(self) -> Iterable[dict[str, Any]]:
        """This rank's part of a fresh pass over ``data.val``."""
        from adala.data.pipeline import eval_stream
        from adala.data.transforms import build_transform

        cfg = self.run.cfg
        spec = model_spec(cfg.model)
        transform = build_transform(cfg.data.eval_transform, img_size=cfg.model.img_size, mean=spec.mean, std=spec.std,
                                    scale=cfg.data.scale)
        return eval_stream(self.run.data, fields=self.fields, transform=transform,
                           batch_size=cfg.stage.eval_batch_size or cfg.stage.batch_size, rank=self.strategy.rank,
                           world_size=self.strategy.world_size)

    def periodic(self) -> list[Any]:
        from adala.engine.loop import Periodic

        train = self.run.cfg.train
        work = []
        if self.validation is not None:
            work.append(Periodic("validation", train.eval_every, self.validation, at_end=True, state=self.validation))
        if train.export_every:
            work.append(Periodic("export", train.export_every, self._periodic_export))
        return work

    def _periodic_export(self, model: Any, step: int) -> dict[str, float]:
        self.export(model, f"step-{step}.safetensors", step=step)
        return {}


def _loop_config(cfg: Config, progress: bool) -> Any:
    from adala.engine.loop import LoopConfig

    optim = cfg.stage.optim
    return LoopConfig(
        max_steps=cfg.train.max_steps,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        schedule=optim.schedule,
        power=optim.power,
        warmup_steps=optim.warmup_steps,
        max_grad_norm=optim.max_grad_norm,
        log_every=cfg.train.log_every,
        save_every=cfg.train.save_every,
        keep_last=cfg.train.keep_last,
        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        progress=progress,
        meta=_run_meta(cfg),
    )


def _run_meta(cfg: Config) -> dict[str, str]:
    """What a checkpoint records about its run, and a resuming run must match."""
    return {"stage": cfg.stage.name, "model": cfg.model.name}


def _require_stage(cfg: Config) -> StageConfig:
    if cfg.stage is None:
        raise UserError("no stage selected; add stage=align_attention|align_features|finetune_cls|finetune_seg")
    return cfg.stage


__all__: list[Any] = ["StageResult", "ValidRun", "run_stage", "validate", "validate_run"]
