"""A Stage-2 run on deterministic in-memory data, for comparing strategies and process counts.

Launched by the tests as ``torchrun --nproc-per-node=N tests/distributed_run.py OVERRIDES...``, or imported. Every
step draws one global batch from a seeded generator and each rank takes its slice, so 1 process with batch 2B
and 2 processes with batch B train on exactly the same images.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import torch


class GlobalBatchStream:
    """Seeded global batches of random images, sliced by rank; resumable by position."""

    def __init__(self, global_batch: int, *, rank: int, world_size: int, img_size: int = 32) -> None:
        if global_batch % world_size:
            raise ValueError("the global batch must divide among the ranks")
        self.global_batch, self.rank, self.world_size, self.img_size = global_batch, rank, world_size, img_size
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        per_rank = self.global_batch // self.world_size
        while True:
            generator = torch.Generator().manual_seed(self.position)
            images = torch.randn(self.global_batch, 3, self.img_size, self.img_size, generator=generator)
            self.position += 1
            yield {"image": images[self.rank * per_rank:(self.rank + 1) * per_rank]}


def main(overrides: list[str], global_batch: int = 8) -> None:
    from adala.config import compose
    from adala.run import run_stage

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = compose([*overrides, f"stage.batch_size={global_batch // world_size}"])
    run_stage(cfg, stream=GlobalBatchStream(global_batch, rank=int(os.environ.get("RANK", "0")), world_size=world_size))


if __name__ == "__main__":
    from adala.engine.distributed import exit_process

    main(sys.argv[1:])
    exit_process(0)
