"""Run one stage from a validated config: build its parts, stream its data, fit, export, evaluate."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Optional

from adala.attention import get_kernel
from adala.config import Config, StageConfig, to_yaml
from adala.errors import UserError
from adala.models import check_img_size, get_vfm

log = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"
NEEDS_TEACHER_WEIGHTS = ("align_attention", "align_features")
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
    from adala.data.pipeline import check_data
    from adala.data.transforms import TRANSFORMS
    from adala.engine.distributed import launched_world_size
    from adala.engine.optim import SCHEDULES
    from adala.engine.strategies import check_strategy
    from adala.stages import get_stage

    stage = _require_stage(cfg)
    module = get_stage(stage.name)
    spec = get_vfm(cfg.model.name)
    cfg.model.img_size = cfg.model.img_size or spec.img_size
    check_img_size(spec, cfg.model.img_size)
    if cfg.attention.kind not in ("linear", "softmax"):
        raise UserError(f"unknown attention kind {cfg.attention.kind!r}; use attention=elu1 (linear) or attention=softmax")
    try:
        get_kernel(cfg.attention.kernel)
    except ValueError as err:
        raise UserError(str(err)) from None
    for key, path in (("model.weights", cfg.model.weights), ("stage.init", stage.init)):
        if path is not None and path not in pending and not os.path.isfile(path):
            raise UserError(f"{key}={path}: file not found; point it at a weight file or an adala export")
    if stage.name in NEEDS_TEACHER_WEIGHTS and cfg.model.weights is None:
        raise UserError(f"stage {stage.name} aligns to a pretrained teacher; set model.weights=PATH to its weights")
    if stage.name in NEEDS_LABELS and getattr(cfg.data, NEEDS_LABELS[stage.name]) <= 0:
        raise UserError(f"stage {stage.name} needs data.{NEEDS_LABELS[stage.name]}; pick a labelled data= config")
    if stage.optim.schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {stage.optim.schedule!r}; use stage.optim.schedule={' or '.join(SCHEDULES)}")
    for key, name in (("transform", cfg.data.train_transform or stage.transform), ("eval_transform", cfg.data.eval_transform)):
        if name not in TRANSFORMS:
            raise UserError(f"unknown {key} {name!r}; use one of {', '.join(TRANSFORMS)}")
    world_size = world_size or launched_world_size()
    check_strategy(cfg.strategy, precision=cfg.train.precision, device=cfg.train.device)
    check_data(cfg.data, mode=module.STREAM, world_size=world_size)
    if cfg.train.max_steps is None:
        if stage.epochs is None or cfg.data.train_samples is None:
            raise UserError("set train.max_steps, or stage.epochs together with data.train_samples")
        global_batch = stage.batch_size * world_size  # stage.batch_size is per rank (per GPU)
        cfg.train.max_steps = max(1, math.ceil(stage.epochs * cfg.data.train_samples / global_batch))
    if cfg.train.max_steps <= 0 or stage.batch_size <= 0:
        raise UserError("train.max_steps and stage.batch_size must be positive")
    cfg.run_dir = cfg.run_dir or f"runs/{stage.name}-{cfg.model.name}"
    _check_resume(cfg, world_size)
    return cfg


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
    """
    from adala.data.pipeline import eval_stream, train_stream
    from adala.data.transforms import build_transform
    from adala.engine import distributed
    from adala.engine.evaluate import evaluate
    from adala.engine.loop import fit
    from adala.engine.state import seed_everything
    from adala.engine.strategies import build_strategy
    from adala.stages import get_stage

    cfg = validate(cfg)
    stage = _require_stage(cfg)
    strategy = build_strategy(cfg.strategy, device=cfg.train.device, precision=cfg.train.precision, batch_size=stage.batch_size)
    try:
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        module = get_stage(stage.name)
        parts = module.build(cfg)  # loads the weights: a file that does not fit fails here, before anything is written
        run_dir = Path(cfg.run_dir)
        if strategy.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        seed_everything(cfg.train.seed + strategy.rank)  # different augmentations and dropout on each rank
        spec = get_vfm(cfg.model.name)
        if stream is None:
            transform = build_transform(cfg.data.train_transform or stage.transform, img_size=cfg.model.img_size,
                                        mean=spec.mean, std=spec.std)
            stream = train_stream(cfg.data, fields=module.FIELDS, mode=module.STREAM, transform=transform,
                                  batch_size=stage.batch_size, seed=cfg.train.seed, rank=strategy.rank,
                                  world_size=strategy.world_size)
        trainer = fit(parts, stream, _loop_config(cfg), strategy=strategy, run_dir=run_dir, resume=cfg.resume)
        export = run_dir / "export" / EXPORT_NAME
        state = strategy.full_state_dict(trainer.model)  # every rank takes part in gathering the shards
        if strategy.is_main:
            parts.export(state, export)
        metrics: dict[str, float] = {}
        if parts.metric is not None and cfg.data.val is not None:
            eval_transform = build_transform(cfg.data.eval_transform, img_size=cfg.model.img_size, mean=spec.mean, std=spec.std)
            val = eval_stream(cfg.data, fields=module.FIELDS, transform=eval_transform, batch_size=stage.batch_size,
                              rank=strategy.rank, world_size=strategy.world_size)
            metrics = evaluate(trainer.model, val, parts.metric(), strategy=strategy)
            if strategy.is_main:
                (run_dir / "metrics.json").write_text(json.dumps({"step": trainer.state.step, **metrics}, indent=2) + "\n")
        distributed.barrier()
    finally:
        strategy.close()
    log.info("%s done after %d steps; export %s%s", stage.name, trainer.state.step, export,
             "".join(f", {k} {v:.4f}" for k, v in metrics.items()))
    return StageResult(run_dir=run_dir, export=export, steps=trainer.state.step, metrics=metrics)


def _loop_config(cfg: Config) -> Any:
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
        progress=cfg.train.progress,
        meta=_run_meta(cfg),
    )


def _run_meta(cfg: Config) -> dict[str, str]:
    """What a checkpoint records about its run, and a resuming run must match."""
    return {"stage": cfg.stage.name, "model": cfg.model.name}


def _require_stage(cfg: Config) -> StageConfig:
    if cfg.stage is None:
        raise UserError("no stage selected; add stage=align_attention|align_features|finetune_cls|finetune_seg")
    return cfg.stage


__all__: list[Any] = ["StageResult", "run_stage", "validate"]
