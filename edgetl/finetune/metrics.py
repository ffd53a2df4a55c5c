"""Classification metrics from a confusion matrix: accuracy, per-class accuracy, a JSON-friendly report,
and the Wilson score interval that says how far an accuracy measured on n images can be trusted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from edgetl.errors import ConfigError

CONFIDENCE = 0.95
"""The confidence of the intervals edgetl reports."""


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (e.g. the images classified right).

    Unlike the normal approximation it stays within [0, 1] and is sound for small ``n`` and for
    proportions near 0 or 1 (Wilson 1927; Newcombe 1998, method 3). It has no continuity correction.

    Args:
        successes: the count of successes, ``0 <= successes <= n``.
        n: the count of trials; with none, the interval is the whole of [0, 1].
        confidence: the two-sided confidence level, in (0, 1).

    Returns:
        ``(low, high)``, with ``low`` exactly 0 when ``successes`` is 0 and ``high`` exactly 1 when it is ``n``.

    Raises:
        ConfigError: a negative ``n``, ``successes`` outside [0, n], or a confidence outside (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ConfigError(f"a Wilson interval needs 0 <= successes <= n, got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"the confidence of an interval must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def interval_dict(successes: int, n: int, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The Wilson interval as ``metrics.json`` holds it: ``{"low", "high", "confidence", "method"}``."""
    low, high = wilson_interval(successes, n, confidence)
    return {"low": round(low, 6), "high": round(high, 6), "confidence": confidence, "method": "wilson"}


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
    def correct(self) -> int:
        """Images classified right (the confusion matrix's diagonal)."""
        return sum(self.confusion[i][i] for i in range(len(self.confusion)))

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in [0, 1] (0 for an empty split)."""
        return self.correct / self.images if self.images else 0.0

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """The Wilson score interval of the accuracy (see :func:`wilson_interval`)."""
        return wilson_interval(self.correct, self.images, confidence)

    def per_class(self, classes: list[str]) -> dict[str, float | None]:
        """Accuracy (recall) of each class; None for a class with no images in the split."""
        out: dict[str, float | None] = {}
        for i, name in enumerate(classes):
            total = sum(self.confusion[i])
            out[name] = self.confusion[i][i] / total if total else None
        return out

    def per_class_images(self, classes: list[str]) -> dict[str, int]:
        """Images of each class in the split."""
        return {name: sum(self.confusion[i]) for i, name in enumerate(classes)}

    def to_dict(self, classes: list[str]) -> dict[str, Any]:
        """A JSON-friendly report: accuracy with its count and 95% Wilson interval, loss, per class, confusion."""
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "images": self.images,
            "ci95": interval_dict(self.correct, self.images),
            "loss": self.loss,
            "per_class_accuracy": self.per_class(classes),
            "per_class_images": self.per_class_images(classes),
            "confusion_matrix": self.confusion,
        }
