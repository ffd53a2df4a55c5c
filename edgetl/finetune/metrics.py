"""Classification metrics from a confusion matrix: accuracy, per-class accuracy, a JSON-friendly report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """The result of evaluating a classifier on one split.

    Attributes:
        loss: mean cross-entropy.
        confusion: ``confusion[true][pred]`` counts, ``num_classes x num_classes``.
        images: number of images evaluated.
    """

    loss: float
    confusion: list[list[int]] = field(default_factory=list)
    images: int = 0

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in [0, 1] (0 for an empty split)."""
        correct = sum(self.confusion[i][i] for i in range(len(self.confusion)))
        return correct / self.images if self.images else 0.0

    def per_class(self, classes: list[str]) -> dict[str, float | None]:
        """Accuracy (recall) of each class; None for a class with no images in the split."""
        out: dict[str, float | None] = {}
        for i, name in enumerate(classes):
            total = sum(self.confusion[i])
            out[name] = self.confusion[i][i] / total if total else None
        return out

    def to_dict(self, classes: list[str]) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "images": self.images,
            "per_class_accuracy": self.per_class(classes),
            "confusion_matrix": self.confusion,
        }
