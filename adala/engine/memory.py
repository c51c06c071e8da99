"""A rank's memory budget: what its student, optimizer, teacher and activations take, logged at start-up and
used to decide whether the frozen teacher is replicated or sharded (``strategy.teacher=auto``)."""
from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

GB = 1e9
# Tensors a ViT block keeps for backward, in units of tokens × width: LayerNorm inputs, QKV (3), attention
# output, projection, the MLP's hidden layer before and after GELU (2 × 4) and its output.
SAVED_PER_BLOCK = 16


def tensor_bytes(tensors: Iterable[torch.Tensor], dtype: Optional[torch.dtype] = None) -> int:
    """Bytes held on this rank (the local shard of a DTensor); ``dtype`` counts them as if cast to it."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None else local.element_size()
        total += local.numel() * size
    return total


def available_bytes(device: torch.device) -> int:
    """Free memory this rank may use: free GPU memory, or free host memory split among the node's ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().available // local_ranks)


class MemoryBudget:
    """Bytes per rank by role. Parameters, gradients and optimizer state are counted as held (after sharding);
    activations are an estimate from the first batch's shape."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts: dict[str, int] = {}

    def count_trainable(self, model: nn.Module, *, param_shards: int = 1, state_shards: int = 1) -> None:
        """Parameters, gradients and AdamW state; ``*_shards``: how many ranks share them where the tensors
        themselves do not show it (DeepSpeed ZeRO; FSDP's DTensors report their local shard)."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        params = tensor_bytes(trainable) + tensor_bytes(frozen)
        grads = tensor_bytes(trainable, dtype=torch.float32)
        self.parts["student params"] = params // param_shards
        self.parts["student grads"] = grads // state_shards
        self.parts["optimizer state"] = 2 * grads // state_shards  # AdamW: two fp32 moments per trained value

    def count_teacher(self, teacher: nn.Module, mode: str) -> None:
        self.parts[f"teacher ({mode})"] = tensor_bytes(teacher.parameters())

    def count_activations(self, model: nn.Module, batch: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> None:
        self.parts["activations (estimate)"] = activation_bytes(model, batch["image"], dtype)

    def teacher_fits(self, teacher: int) -> bool:
        """Whether a replicated teacher leaves at least half of the free memory for the student's training."""
        return teacher + sum(self.parts.values()) <= available_bytes(self.device) // 2

    def describe(self) -> str:
        items = ", ".join(f"{name} {value / GB:.3f}" for name, value in self.parts.items())
        return f"memory budget (GB): {items}; total {sum(self.parts.values()) / GB:.3f} of {available_bytes(self.device) / GB:.1f} free"


def activation_bytes(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    """Activations kept for backward by the timm ViTs in ``model`` at this batch (a block-level estimate; with
    gradient checkpointing only each block's input plus one block's internals are kept)."""
    element = torch.empty((), dtype=dtype or torch.float32).element_size()
    total = 0
    for vit in (m for m in model.modules() if hasattr(m, "patch_embed") and hasattr(m, "blocks")):
        height, width = vit.patch_embed.dynamic_feat_size(images.shape[-2:])
        tokens = images.shape[0] * (height * width + vit.num_prefix_tokens)
        per_block = tokens * vit.embed_dim * SAVED_PER_BLOCK * element
        depth = len(vit.blocks)
        if getattr(vit, "grad_checkpointing", False):
            total += depth * tokens * vit.embed_dim * element + per_block
        else:
            total += depth * per_block
    return total
