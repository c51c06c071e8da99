"""The single-process strategy, and the interface every strategy implements.

The loop talks only to these methods; DDP, FSDP2 and DeepSpeed are subclasses that change how the trained
model is wrapped and stepped, where the frozen teacher lives, and how a checkpoint is written.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from adala.engine import distributed
from adala.engine.memory import MemoryBudget, tensor_bytes
from adala.engine.optim import build_optimizer

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHER_MODES = ("auto", "replicate", "shard")
ParamGroups = Callable[[nn.Module], list[dict[str, Any]]]


class Strategy:
    """One process on one device (CPU, or one GPU); the base of the distributed strategies."""

    name = "single"
    checkpoint_format = "dcp"  # torch.distributed.checkpoint: model and optimizer load on any number of ranks
    needs_process_group = False

    def __init__(self, cfg: Any, *, device: str = "auto", precision: str = "fp32", batch_size: int = 1) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.precision = precision
        self.batch_size = batch_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", distributed.local_rank())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        distributed.init_process_group(self.device, required=self.needs_process_group)
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.memory = MemoryBudget(device=self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        return PRECISIONS[self.precision]

    # --- placing models -------------------------------------------------------------------------------------
    def prepare(
        self, model: nn.Module, param_groups: ParamGroups, *, lr: float, weight_decay: float, max_grad_norm: Optional[float]
    ) -> tuple[nn.Module, Any]:
        """Place (and wrap) the trained model and build its optimizer; returns what the loop calls and steps."""
        self._block_options(model)
        model = self._wrap(self._place(model))
        optimizer = build_optimizer(param_groups(self.unwrap(model)), lr=lr, weight_decay=weight_decay)
        self.memory.count_trainable(self.unwrap(model))
        return model, optimizer

    def _place(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The stage's own module inside whatever wrapper the strategy added."""
        return model

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """The frozen teacher: eval mode, no gradients, never in the optimizer; replicated on this device, in the
        compute precision (a bf16 run keeps a bf16 teacher), or sharded by :meth:`_shard_frozen`."""
        module.eval().requires_grad_(False)
        mode = self._teacher_mode(module)
        if mode == "shard":
            module = self._shard_frozen(module)
        else:
            module.to(self.device, dtype=self.compute_dtype or torch.float32)
        self.memory.count_teacher(module, mode)
        return module

    def _teacher_mode(self, module: nn.Module) -> str:
        if self.world_size == 1:
            return "replicate"
        if self.cfg.teacher != "auto":
            return self.cfg.teacher
        teacher = tensor_bytes(module.parameters(), dtype=self.compute_dtype)
        chosen = self.memory.teacher_fits(teacher)
        log.info("strategy.teacher=auto: %s the teacher (%.2f GB)", "replicating" if chosen else "sharding", teacher / 1e9)
        return "replicate" if chosen else "shard"

    def _shard_frozen(self, module: nn.Module) -> nn.Module:
        """Sharded like an FSDP student: each block is gathered for its forward and freed after it."""
        from adala.engine.strategies.fsdp import shard

        return shard(module, self.compute_dtype)

    def _block_options(self, model: nn.Module) -> None:
        """Per-block activation checkpointing and ``torch.compile``, on every timm ViT inside ``model``."""
        for vit in vits(model):
            if self.cfg.activation_checkpointing:
                vit.set_grad_checkpointing(True)
        if self.cfg.compile:
            for block in blocks(model):
                block.compile()

    # --- one step -------------------------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        dtype = self.compute_dtype
        return nullcontext() if dtype is None else torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, model: nn.Module, optimizer: Any, max_grad_norm: Optional[float]) -> Optional[float]:
        norm = None
        if max_grad_norm:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            total = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self, model: nn.Module, optimizer: Any) -> None:
        """Drop this step's gradients without updating anything (a non-finite loss)."""
        optimizer.zero_grad(set_to_none=True)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # --- checkpoints and export -----------------------------------------------------------------------------
    def save_state(self, directory: Path, model: nn.Module, optimizer: Any) -> None:
        """Write model and optimizer state into ``directory`` (all ranks call this)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.unwrap(model), optimizer)
        with _single_process_ok():
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory),
                     no_dist=not distributed.is_initialized())

    @classmethod
    def check_world_size(cls, path: Path, *, saved: int, current: int, cfg: Any) -> None:
        """Raise if a checkpoint written by ``saved`` ranks cannot be resumed on ``current`` (DCP reshards: it can)."""

    def load_state(self, directory: Path, model: nn.Module, optimizer: Any, saved_world_size: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        module = self.unwrap(model)
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(directory), no_dist=not distributed.is_initialized())
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained model's complete, unsharded fp32 weights on CPU, on the main rank ({} elsewhere)."""
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in self.unwrap(model).state_dict().items()}

    def close(self) -> None:
        distributed.destroy_process_group()


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every save and load without a process group; in a single process that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def vits(model: nn.Module) -> Iterable[nn.Module]:
    """Every timm ViT inside ``model`` (modules with per-block gradient checkpointing)."""
    return [m for m in model.modules() if hasattr(m, "set_grad_checkpointing") and hasattr(m, "blocks")]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the members of every ``blocks`` container, the units that FSDP shards
    and that activation checkpointing and ``torch.compile`` wrap one by one."""
    found: list[nn.Module] = []
    for module in model.modules():
        container = getattr(module, "blocks", None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            found.extend(container)
    return found
