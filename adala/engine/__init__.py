"""The training engine: one loop, strategies, checkpoints, preemption and evaluation over ranks."""
