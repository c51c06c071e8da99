"""How the trained model is placed and stepped: the loop only ever talks to a :class:`Strategy`."""
from __future__ import annotations

from typing import Any

from adala.engine.strategies.base import Strategy
from adala.errors import UserError, require_extra


def _ddp() -> type[Strategy]:
    from adala.engine.strategies.ddp import DDPStrategy

    return DDPStrategy


def _fsdp() -> type[Strategy]:
    from adala.engine.strategies.fsdp import FSDPStrategy

    return FSDPStrategy


def _deepspeed() -> type[Strategy]:
    from adala.engine.strategies.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy


STRATEGIES = {"single": lambda: Strategy, "ddp": _ddp, "fsdp": _fsdp, "deepspeed": _deepspeed}


def check_strategy(cfg: Any, *, precision: str, device: str) -> None:
    """What a user can get wrong in ``strategy.*``, ``train.precision`` and ``train.device``, before any process
    does work."""
    import torch

    from adala.engine.strategies.base import PRECISIONS, TEACHER_MODES

    if cfg.name not in STRATEGIES:
        raise UserError(f"unknown strategy {cfg.name!r}; use strategy={' or '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use train.precision={' or '.join(PRECISIONS)}")
    if cfg.teacher not in TEACHER_MODES:
        raise UserError(f"unknown strategy.teacher {cfg.teacher!r}; use one of {', '.join(TEACHER_MODES)}")
    on_cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={device}, but CUDA is not available here; set train.device=cpu")
    if cfg.cpu_offload and not on_cuda:
        raise UserError("strategy.cpu_offload moves GPU state into host memory and needs CUDA; on the CPU "
                        "everything is in host memory already: drop strategy.cpu_offload")
    if cfg.name == "deepspeed":
        from adala.engine.strategies.deepspeed import read_user_config

        require_extra("deepspeed", "strategy=deepspeed")
        if cfg.zero_stage not in (2, 3):
            raise UserError(f"strategy.zero_stage={cfg.zero_stage}: use 2 or 3")
        read_user_config(cfg.deepspeed_config)


def build_strategy(cfg: Any, *, device: str, precision: str, batch_size: int) -> Strategy:
    """The strategy ``cfg.name`` (a :class:`adala.config.StrategyConfig`); DeepSpeed is imported only when chosen."""
    check_strategy(cfg, precision=precision, device=device)
    return STRATEGIES[cfg.name]()(cfg, device=device, precision=precision, batch_size=batch_size)


__all__ = ["STRATEGIES", "Strategy", "build_strategy", "check_strategy"]
