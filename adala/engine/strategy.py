"""How a model is placed and stepped: the loop only talks to a Strategy, never to DDP/FSDP/DeepSpeed directly.

This module has the single-process strategy; the distributed ones plug in behind the same methods.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch
from torch import nn

from adala.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy:
    """Single process on one device (CPU, or one GPU)."""

    world_size = 1
    rank = 0

    def __init__(self, device: str = "auto", precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but CUDA is not available; set train.device=cpu")
        self.device = torch.device(device)
        self.precision = precision

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_trainable(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen teacher: eval mode, no gradients, on this rank's device."""
        module.eval().requires_grad_(False)
        return module.to(self.device)

    def autocast(self) -> AbstractContextManager:
        dtype: Optional[torch.dtype] = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float]) -> Optional[float]:
        norm = None
        if max_grad_norm:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


STRATEGIES = {"single": Strategy}


def build_strategy(name: str, *, device: str, precision: str) -> Strategy:
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; available here: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](device=device, precision=precision)
