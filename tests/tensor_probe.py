"""A probe for tests that a computation forms no N×N tensor."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces: a quadratic intermediate shows up here
    whatever the allocator does, unlike process memory (noisy, shared, and its peak only ever grows) or tracemalloc
    (blind to torch's allocator)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out
