"""FSDP2: ``fully_shard`` on every transformer block, then on the root; parameters in the compute precision,
gradients reduced in fp32, optionally offloaded to CPU. The frozen teacher can be sharded the same way."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from adala.engine.strategies.base import Strategy, blocks


def _policies(compute_dtype: Optional[torch.dtype], *, cast_inputs: bool) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=cast_inputs)


def shard(module: nn.Module, compute_dtype: Optional[torch.dtype], *, cpu_offload: bool = False) -> nn.Module:
    """Shard each block, then the root. The root keeps its inputs' dtype: a batch carries fp32 teacher targets
    that must not be rounded to bf16 (autocast casts what the layers compute with)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in blocks(module):
        fully_shard(block, mp_policy=_policies(compute_dtype, cast_inputs=True), offload_policy=offload)
    fully_shard(module, mp_policy=_policies(compute_dtype, cast_inputs=False), offload_policy=offload)
    return module


class FSDPStrategy(Strategy):
    name = "fsdp"
    needs_process_group = True

    def _wrap(self, model: nn.Module) -> nn.Module:
        return shard(model, self.compute_dtype, cpu_offload=self.cfg.cpu_offload)

    def _place(self, model: nn.Module) -> nn.Module:
        return model if self.cfg.cpu_offload else model.to(self.device)  # offloaded shards live in host memory

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
