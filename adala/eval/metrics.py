"""Classification top-1 and segmentation mIoU, accumulated over batches."""
from __future__ import annotations

import torch


class Top1:
    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += int((logits.argmax(dim=-1) == labels).sum())
        self.total += int(labels.numel())

    def compute(self) -> float:
        return self.correct / max(1, self.total)


class MeanIoU:
    """mIoU from a confusion matrix; pixels labelled ``ignore_index`` are left out, and classes that occur in
    neither prediction nor ground truth do not count towards the mean."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        predictions = logits.argmax(dim=1).flatten().cpu()
        truth = masks.flatten().cpu()
        keep = truth != self.ignore_index
        index = truth[keep] * self.num_classes + predictions[keep]
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def compute(self) -> float:
        intersection = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - intersection
        present = union > 0
        return float((intersection[present] / union[present]).mean()) if present.any() else 0.0
