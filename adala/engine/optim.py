"""AdamW over a stage's parameter groups and the paper's learning-rate schedules."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from adala.errors import UserError

SCHEDULES = ("constant", "poly")


def build_optimizer(
    groups: Iterable[dict[str, Any]], *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW; each group may carry ``lr_scale`` (e.g. 0.1 for a pretrained backbone under a new head)."""
    param_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            param_groups.append({"params": params, "lr": lr * group.get("lr_scale", 1.0), "name": group.get("name", "")})
    if not param_groups:
        raise ValueError("the stage has no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=betas)


class LRSchedule:
    """Sets every group's lr to its initial lr × ``factor(step)``. Works on any optimizer that exposes
    ``param_groups``, DeepSpeed's ZeRO optimizers included (torch's schedulers accept only torch optimizers)."""

    def __init__(self, optimizer: Any, factor: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        scale = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def build_schedule(optimizer: Any, *, kind: str, total_steps: int, warmup_steps: int = 0, power: float = 0.9) -> LRSchedule:
    """``constant`` or ``poly`` (factor (1 - t/T)^power), each after an optional linear warm-up."""
    if kind not in SCHEDULES:
        raise UserError(f"unknown lr schedule {kind!r}; use one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (1.0 - progress) ** power

    return LRSchedule(optimizer, factor)
