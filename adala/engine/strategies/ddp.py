"""DistributedDataParallel: the trained model replicated on every rank, gradients averaged by all-reduce."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adala.engine.strategies.base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model
