"""The one training loop: resume → for each step: train step → log → maybe save.

It knows no stage and no strategy by name: a stage hands it :class:`StageParts`, a strategy places and steps
the models, and every stateful piece goes to one :class:`CheckpointManager`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from adala.engine.checkpoint import CheckpointManager, Stateful
from adala.engine.metrics_log import MetricLogger
from adala.engine.optim import build_optimizer, build_schedule
from adala.engine.state import RNGState, TrainState
from adala.engine.strategy import Strategy
from adala.errors import UserError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StageParts:
    """What a stage hands the loop.

    ``model`` holds every trained parameter and is checkpointed; ``loss`` maps a batch to (scalar loss, scalars
    to log); ``export`` writes the stage's product from the trained ``model``; ``frozen`` modules (a teacher) are
    placed by the strategy but never optimised or checkpointed.
    """

    model: nn.Module
    param_groups: list[dict[str, Any]]
    loss: LossFn
    export: Callable[[Path], Path]
    frozen: list[nn.Module] = field(default_factory=list)
    evaluate: Optional[Callable[[Iterable[Batch]], dict[str, float]]] = None


@dataclass
class LoopConfig:
    max_steps: int
    lr: float
    weight_decay: float = 0.05
    schedule: str = "constant"
    power: float = 0.9
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = None
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    progress: bool = True


class NonFiniteLossError(RuntimeError):
    pass


def fit(
    parts: StageParts,
    stream: Iterable[Batch] | Stateful,
    cfg: LoopConfig,
    *,
    strategy: Strategy,
    run_dir: Path,
    resume: Optional[str] = None,
) -> TrainState:
    """Train ``parts`` on ``stream`` for ``cfg.max_steps`` steps, checkpointing into ``run_dir/checkpoints``.

    ``resume``: None (start fresh), ``"auto"`` (latest complete checkpoint if any) or a checkpoint directory.
    """
    model = strategy.prepare_trainable(parts.model)
    for frozen in parts.frozen:
        strategy.prepare_frozen(frozen)
    optimizer = build_optimizer(parts.param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = build_schedule(
        optimizer, kind=cfg.schedule, total_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, power=cfg.power
    )
    state = TrainState()
    checkpoints = CheckpointManager(
        run_dir / "checkpoints",
        {"model": model, "optimizer": optimizer, "schedule": schedule, "train": state, "data": stream, "rng": RNGState()},
        keep_last=cfg.keep_last,
    )
    start = _resume_point(checkpoints, resume)
    if start is not None:
        checkpoints.load(start)
        log.info("resumed from %s at step %d", start, state.step)
    logger = MetricLogger(
        run_dir, total_steps=cfg.max_steps, start=(state.step, state.images), enabled=strategy.is_main, progress=cfg.progress
    )
    model.train()
    batches = iter(stream)
    try:
        while state.step < cfg.max_steps:
            batch = strategy.to_device(next(batches))
            with strategy.autocast():
                loss, scalars = parts.loss(batch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {state.step + 1}; nothing was saved after the last good "
                    f"checkpoint ({checkpoints.latest() or 'none yet'}); lower the learning rate or check the inputs"
                )
            strategy.backward(loss)
            grad_norm = strategy.optimizer_step(optimizer, cfg.max_grad_norm)
            schedule.step()
            state.step += 1
            state.images += batch["image"].shape[0] * strategy.world_size
            write = state.step % cfg.log_every == 0 or state.step == cfg.max_steps
            logger.step(state.step, state.images, _scalars(loss, scalars, optimizer, grad_norm) if write else {}, write=write)
            if state.step % cfg.save_every == 0 or state.step == cfg.max_steps:
                checkpoints.save(state.step)
    finally:
        logger.close()
    return state


def _resume_point(checkpoints: CheckpointManager, resume: Optional[str]) -> Optional[Path]:
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return checkpoints.latest()
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume}: no such checkpoint directory; use resume=auto or a checkpoints/step-N path")
    return path


def _scalars(
    loss: torch.Tensor, extra: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, grad_norm: Optional[float]
) -> dict[str, float]:
    out = {"loss": loss.item(), **{f"loss/{k}": float(v) for k, v in extra.items()}}
    for index, group in enumerate(optimizer.param_groups):
        out[f"lr/{group.get('name') or index}"] = group["lr"]
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    return out
