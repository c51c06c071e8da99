"""The process group: started from the environment ``torchrun`` (or SLURM/Ray through it) sets, and small
collectives the loop needs. Every function also works in a plain single process, without a process group."""
from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_created_here = False  # a group a launcher set up (Ray Train) is the launcher's to end
_joined_launched_group = False  # this process is one rank of a torchrun launch (see exit_process)


def launched_world_size() -> int:
    """The number of processes this run was launched with (``WORLD_SIZE``, 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device, *, required: bool = False, timeout_s: int = 1800) -> None:
    """Join the launcher's process group: nccl on CUDA, gloo on CPU. A plain single process gets a one-rank
    group on loopback only when ``required`` (FSDP and DeepSpeed always work through one)."""
    global _created_here, _joined_launched_group
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" not in os.environ:
        if required:  # an in-process store: no port, no environment variables
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            _created_here = True
        return
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _created_here = _joined_launched_group = True
    log.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)


def is_initialized() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum/max/min over ranks (gloo cannot average, so ``mean`` divides a sum)."""
    if not dist.is_initialized():
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op)
    if op == "mean":
        tensor /= dist.get_world_size()
    return tensor


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy_process_group() -> None:
    """End the process group if :func:`init_process_group` started it; one the launcher started stays."""
    global _created_here
    if _created_here and dist.is_initialized():
        dist.destroy_process_group()
    _created_here = False


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. A rank of a torchrun launch leaves through ``os._exit`` once its output is
    flushed: FSDP2's device mesh keeps the process group alive past :func:`destroy_process_group`, and the group's
    gloo worker threads then race the interpreter's finalisation, which now and then aborts a rank whose run had
    finished ("terminate called without an active exception", SIGABRT), failing the whole launch."""
    if not _joined_launched_group:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
