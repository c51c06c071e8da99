"""Evaluation over all ranks: each rank reads its own part of the validation set, the metric is summed.

Ranks may hold different numbers of batches. Sharded models (FSDP, ZeRO-3) need every rank in every
forward, so a rank that has run out repeats a forward on a batch it has seen and discards the output.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from adala.engine import distributed
from adala.engine.strategies import Strategy


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, Any]], metric: Any, *, strategy: Strategy) -> dict[str, float]:
    """``metric`` accumulated over ``batches`` on every rank, summed over ranks."""
    model.eval()
    remaining = iter(batches)
    filler: Optional[dict[str, Any]] = None
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
    metric.sync(distributed.all_reduce)
    model.train()
    return metric.compute()


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
