"""Evaluation metrics."""
from adala.eval.metrics import MeanIoU, Top1

__all__ = ["MeanIoU", "Top1"]
