"""The one training loop: resume → for each step: train step → periodic work → log → maybe save.

It knows no stage, no strategy and no launcher by name: a stage hands it :class:`StageParts`, a strategy
places, wraps and steps the models, the caller adds :class:`Periodic` work (evaluation, exports), and every
stateful piece goes to one :class:`CheckpointManager`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from adala.engine import distributed
from adala.engine.checkpoint import CheckpointManager, Stateful
from adala.engine.metrics_log import MetricLogger
from adala.engine.optim import build_schedule
from adala.engine.preemption import Preempted, PreemptionFlag
from adala.engine.state import RNGState, TrainState
from adala.engine.strategies import Strategy
from adala.errors import UserError

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class StepOutput(NamedTuple):
    """What a stage's model returns for a batch: the loss to minimise, scalars to log (averaged over ranks),
    and optionally its predictions (for evaluation). A named tuple, because wrappers (DDP, FSDP, DeepSpeed
    ZeRO-3) hook the tensors of a module's output and know tuples, not dataclasses."""

    loss: torch.Tensor
    scalars: dict[str, torch.Tensor] = {}
    prediction: Optional[torch.Tensor] = None


@dataclass
class StageParts:
    """What a stage hands the loop.

    ``model`` holds every trained parameter and is checkpointed; its ``forward(batch)`` returns a
    :class:`StepOutput`. ``teacher``, when given, is frozen: the strategy places it beside the model (never in
    the optimizer or a checkpoint) and its output for ``batch["image"]`` reaches the model as
    ``batch["target"]``. ``param_groups`` maps the placed model to optimizer groups; ``export(state, path,
    **metadata)`` writes the stage's product from the model's full state dict, with ``metadata`` (e.g. the step)
    added to the stage's own; ``metric`` makes an evaluation metric whose ``update(prediction, batch)`` reads
    what it needs from the batch.
    """

    model: nn.Module
    param_groups: Callable[[nn.Module], list[dict[str, Any]]]
    export: Callable[..., Path]
    teacher: Optional[nn.Module] = None
    metric: Optional[Callable[[], Any]] = None


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
    max_nonfinite_steps: int = 5
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Periodic:
    """Work done every ``every`` steps (and after the last step if ``at_end``), between the optimizer step and
    that step's checkpoint: evaluation, exports.

    ``run(model, step)`` gets the placed model; it is a collective (every rank calls it at the same step) and
    returns scalars to log with the step, the same keys on every rank. The RNG states are restored after it, so
    it leaves training exactly as it was. ``state``, if given, is checkpointed with the run under ``name``.
    A step that ends in a preemption checkpoint skips its periodic work, to save within the grace time.
    """

    name: str
    every: int
    run: Callable[[nn.Module, int], Mapping[str, float]]
    at_end: bool = False
    state: Optional[Stateful] = None

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == last_step)


class NonFiniteLossError(UserError):
    pass


@dataclass
class Trainer:
    """What a finished :func:`fit` leaves: the placed (wrapped, sharded) model, for export and evaluation, and
    the run's counters."""

    model: nn.Module
    state: TrainState


def fit(
    parts: StageParts,
    stream: Iterable[Batch],
    cfg: LoopConfig,
    *,
    strategy: Strategy,
    run_dir: Path,
    resume: Optional[str] = None,
    periodic: Sequence[Periodic] = (),
) -> Trainer:
    """Train ``parts`` on ``stream`` for ``cfg.max_steps`` steps, checkpointing into ``run_dir/checkpoints``.

    ``resume``: None/"none" (start fresh), ``"auto"`` (latest complete checkpoint, if any) or a checkpoint
    directory. ``periodic``: work between steps (see :class:`Periodic`). A preemption signal saves at the next
    step boundary and raises :class:`Preempted`.
    """
    model, optimizer = strategy.prepare(
        parts.model, parts.param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm
    )
    teacher = strategy.prepare_frozen(parts.teacher) if parts.teacher is not None else None
    schedule = build_schedule(
        optimizer, kind=cfg.schedule, total_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, power=cfg.power
    )
    state = TrainState()
    states: dict[str, Stateful] = {"schedule": schedule, "train": state, "rng": RNGState()}
    if hasattr(stream, "state_dict"):
        states["data"] = stream  # type: ignore[assignment]
    states.update({work.name: work.state for work in periodic if work.state is not None})
    checkpoints = CheckpointManager(
        run_dir / "checkpoints", strategy=strategy, model=model, optimizer=optimizer, states=states, meta=cfg.meta,
        keep_last=cfg.keep_last,
    )
    start = checkpoints.resume_point(resume)
    if start is not None:
        checkpoints.load(start)
        log.info("resumed from %s at step %d", start, state.step)
    logger = MetricLogger(
        run_dir, total_steps=cfg.max_steps, start=(state.step, state.images), enabled=strategy.is_main, progress=cfg.progress
    )
    preemption = PreemptionFlag().install()
    model.train()
    batches = iter(stream)
    nonfinite_in_a_row = 0
    try:
        while state.step < cfg.max_steps:
            batch = strategy.to_device(next(batches))
            if "activations (estimate)" not in strategy.memory.parts:
                strategy.memory.count_activations(strategy.unwrap(model), batch, strategy.compute_dtype)
                log.info("%s", strategy.memory.describe())
            with strategy.autocast():
                if teacher is not None:
                    with torch.no_grad():
                        batch["target"] = teacher(batch["image"])
                out = model(batch)
            loss, finite, preempt = _agree(out.loss, preemption.requested)
            if not finite:
                strategy.skip_step(model, optimizer)
                state.nonfinite_skipped += 1
                nonfinite_in_a_row += 1
                log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in all)",
                            state.step + 1, nonfinite_in_a_row, state.nonfinite_skipped)
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"the loss was not finite for {nonfinite_in_a_row} steps in a row (at step {state.step + 1}); "
                        f"the last good checkpoint is {checkpoints.latest() or 'none yet'}; lower the learning rate "
                        "(stage.optim.lr), set stage.optim.max_grad_norm, or check the inputs"
                    )
            else:
                nonfinite_in_a_row = 0
                strategy.backward(model, out.loss)
                lrs = {f"lr/{group.get('name') or i}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
                grad_norm = strategy.optimizer_step(model, optimizer, cfg.max_grad_norm)
                schedule.step()
                state.step += 1
                state.images += batch["image"].shape[0] * strategy.world_size
                due = [] if preempt else [work for work in periodic if work.due(state.step, cfg.max_steps)]
                with logger.paused():
                    periodic_scalars = _run_periodic(due, model, state.step)
                write = state.step % cfg.log_every == 0 or state.step == cfg.max_steps or bool(due)
                scalars = _scalars(loss, out.scalars, lrs, grad_norm, stream, state) if write else {}
                logger.step(state.step, state.images, {**scalars, **periodic_scalars}, write=write)
                if state.step % cfg.save_every == 0 or state.step == cfg.max_steps:
                    checkpoints.save(state.step)
                    if preempt:
                        raise Preempted(state.step, checkpoints.directory / f"step-{state.step}", preemption.signum)
                    continue
            if preempt:
                raise Preempted(state.step, checkpoints.save(state.step), preemption.signum)
    finally:
        preemption.uninstall()
        logger.close()
    return Trainer(model=model, state=state)


def _run_periodic(due: Sequence[Periodic], model: nn.Module, step: int) -> dict[str, float]:
    """Run the due work; the RNG states (dropout, augmentation, data-loader seeds) are put back afterwards."""
    if not due:
        return {}
    rng = RNGState()
    saved = rng.state_dict()
    scalars: dict[str, float] = {}
    try:
        for work in due:
            scalars.update(work.run(model, step))
    finally:
        rng.load_state_dict(saved)
        model.train()
    return scalars


def _agree(loss: torch.Tensor, preempt_requested: bool) -> tuple[float, bool, bool]:
    """One all-reduce for what every rank must agree on: the mean loss, whether it is finite on all ranks,
    and whether any rank was asked to stop."""
    value = loss.detach().float()
    finite = bool(torch.isfinite(value))
    packed = torch.tensor([value.item() if finite else 0.0, 0.0 if finite else 1.0, float(preempt_requested)],
                          dtype=torch.float64)
    distributed.all_reduce(packed)
    world = distributed.world_size()
    return float(packed[0]) / world, packed[1].item() == 0, packed[2].item() > 0


def _scalars(
    loss: float, extra: dict[str, torch.Tensor], lrs: dict[str, float], grad_norm: Optional[float], stream: Any,
    state: TrainState,
) -> dict[str, float]:
    """What a logged step records (the learning rates it used); stage scalars are averaged and data counters
    summed over ranks."""
    out = {"loss": loss, **lrs}
    if extra:
        values = distributed.all_reduce(torch.stack([v.detach().float().cpu() for v in extra.values()]), op="mean")
        out.update({f"loss/{k}": float(v) for k, v in zip(extra, values)})
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    counters = stream.counters() if hasattr(stream, "counters") else {}
    if counters:
        totals = distributed.all_reduce(torch.tensor(list(counters.values()), dtype=torch.float64))
        out.update({f"data/{k}": float(v) for k, v in zip(counters, totals)})
    if state.nonfinite_skipped:
        out["nonfinite_skipped"] = float(state.nonfinite_skipped)
    return out
