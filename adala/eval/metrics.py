"""Classification top-1 and segmentation mIoU, accumulated over batches and summed over ranks.

A metric reads its targets from the batch (``update(prediction, batch)``); :meth:`sync` takes an in-place
all-reduce (sum) so that every rank ends with the totals of all ranks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class Top1:
    name = "top1"

    def __init__(self) -> None:
        self.counts = torch.zeros(2, dtype=torch.float64)  # correct, images

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch["label"]
        self.counts[0] += int((logits.argmax(dim=-1) == labels).sum())
        self.counts[1] += int(labels.numel())

    def sync(self, all_reduce: AllReduce) -> None:
        all_reduce(self.counts)

    def compute(self) -> dict[str, float]:
        return {self.name: float(self.counts[0] / self.counts[1].clamp(min=1)), "val_images": float(self.counts[1])}


class MeanIoU:
    """mIoU from a confusion matrix; pixels labelled ``ignore_index`` are left out, and classes that occur in
    neither prediction nor ground truth do not count towards the mean."""

    name = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.images = torch.zeros(1, dtype=torch.long)

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        predictions = logits.argmax(dim=1).flatten().cpu()
        truth = batch["mask"].flatten().cpu()
        keep = truth != self.ignore_index
        index = truth[keep] * self.num_classes + predictions[keep]
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        self.images += batch["mask"].shape[0]

    def sync(self, all_reduce: AllReduce) -> None:
        all_reduce(self.confusion)
        all_reduce(self.images)

    def compute(self) -> dict[str, float]:
        intersection = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - intersection
        present = union > 0
        miou = float((intersection[present] / union[present]).mean()) if present.any() else 0.0
        return {self.name: miou, "val_images": float(self.images)}
