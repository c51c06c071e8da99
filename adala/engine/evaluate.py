"""Evaluation over all ranks: each rank reads its own part of the validation set, the metric is summed.

Ranks may hold different numbers of batches. Sharded models (FSDP, ZeRO-3) need every rank in every
forward, so a rank that has run out repeats a forward on a batch it has seen and discards the output.
:class:`Validation` is evaluation while training, keeping the best model.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from adala.engine import distributed
from adala.engine.strategies import Strategy

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict[str, Any]], metric: Any, *, strategy: Strategy, progress: bool = False
) -> dict[str, float]:
    """``metric`` accumulated over ``batches`` on every rank, summed over ranks; ``progress`` draws a bar."""
    model.eval()
    remaining = iter(batches)
    filler: Optional[dict[str, Any]] = None
    bar = tqdm(desc="evaluating", unit="batch", dynamic_ncols=True, leave=False) if progress else None
    try:
        while True:
            batch = next(remaining, None)
            if not distributed.all_reduce(torch.tensor([batch is not None], dtype=torch.float64), op="max").item():
                break
            if filler is None:  # the first iteration, on every rank
                filler = _borrow_batch(batch)
            inputs = strategy.to_device(batch if batch is not None else filler)
            with strategy.autocast():
                out = model(inputs)
            if batch is not None:
                metric.update(out.prediction.float(), inputs)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    metric.sync(distributed.all_reduce)
    model.train()
    return metric.compute()


class Validation:
    """Evaluation while training, as :class:`adala.engine.loop.Periodic` work: evaluates the model on
    ``batches()`` (a fresh pass over the validation set each time), returns ``val/<metric name>`` to log, and
    calls ``keep_best(model, best)`` (a collective; ``best``: ``{"step": N, <metric name>: value}``) whenever the
    metric beats every earlier value; higher is better. The best so far is checkpointed, so a resumed run keeps comparing against it.
    """

    def __init__(
        self, batches: Callable[[], Iterable[dict[str, Any]]], metric: Callable[[], Any], *, strategy: Strategy,
        keep_best: Callable[[nn.Module, dict[str, float]], Any], progress: bool = False,
    ) -> None:
        self.batches, self.metric, self.strategy, self.keep_best, self.progress = batches, metric, strategy, keep_best, progress
        self.name: str = metric().name
        self.best: Optional[dict[str, float]] = None  # {"step": ..., <metric name>: ...}
        self.last: Optional[tuple[int, dict[str, float]]] = None

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate(model, self.batches(), self.metric(), strategy=self.strategy, progress=self.progress)
        self.last = (step, metrics)
        value = metrics[self.name]
        if self.best is None or value > self.best[self.name]:
            self.best = {"step": step, self.name: value}
            self.keep_best(model, dict(self.best))
        log.info("step %d: val %s %.4f (best %.4f at step %d)", step, self.name, value, self.best[self.name],
                 self.best["step"])
        return {f"val/{self.name}": value}

    def result_at(self, step: int) -> Optional[dict[str, float]]:
        """The metrics of the evaluation at ``step``, if this run made one."""
        return self.last[1] if self.last is not None and self.last[0] == step else None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


def _borrow_batch(batch: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A batch for ranks that have none, taken from the lowest rank that has one (a collective: all ranks call
    it in the same iteration)."""
    has = torch.tensor([distributed.rank() if batch is not None else distributed.world_size()], dtype=torch.float64)
    source = int(distributed.all_reduce(has, op="min").item())
    if distributed.world_size() == 1:
        return batch  # type: ignore[return-value]
    import torch.distributed as dist

    box = [batch if distributed.rank() == source else None]
    dist.broadcast_object_list(box, src=source)
    return box[0] if batch is None else batch
