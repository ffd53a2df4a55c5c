"""Accuracy-controlled INT8: keep in float the quantized layers that cost the most accuracy, and only those.

The idea of NNCF's ``quantize_with_accuracy_control``, on ONNX Runtime's QDQ models (whose graphs stay
laid out for ONNX Runtime's CPU kernels):

1. **Rank.** For every quantized layer, the model quantized with only that layer left in float is run
   on a few calibration images, and its output error against FP32 (the relative squared error of the
   logits) is the layer's score: the lower the error with the layer in float, the more its
   quantization costs. This is the definition of sensitivity itself, not a proxy; it costs one
   re-quantization (calibration is cached) and one small inference pass per layer.
2. **Search.** Keep the k most sensitive layers in float for k = 1, 2, 4, ... until the model is within
   the accuracy budget, then bisect down to the smallest such k: O(log n) full evaluations.
3. **Give up** past ``max_fraction`` of the layers: such a model is better shipped in FP32, and the
   caller reports that INT8 stays over budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_FRACTION = 0.5
"""The most layers, as a fraction of the quantized ones, that accuracy control keeps in float."""


@dataclass
class ControlResult:
    """What accuracy control found.

    Attributes:
        kept_in_float: the layers left in float (most sensitive first); empty when none helped.
        passed: the model with them in float is within the accuracy budget.
        sensitivity: every quantized layer with the output error of the model that keeps only it in
            float, most sensitive (lowest error) first.
        trials: full evaluations made by the search.
    """

    kept_in_float: list[str]
    passed: bool
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    trials: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kept_in_float": list(self.kept_in_float), "passed": self.passed, "trials": self.trials,
                "sensitivity": self.sensitivity}


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """``sum((got - ref)^2) / sum(ref^2)``: the logits' error relative to their size."""
    ref64 = ref.astype(np.float64)
    return float(np.sum((got.astype(np.float64) - ref64) ** 2) / max(float(np.sum(ref64**2)), 1e-30))


def rank_layers(layers: Sequence[str], error_with_float: Callable[[list[str]], float]) -> list[dict[str, Any]]:
    """Score each layer by the error of the model that keeps only it in float; most sensitive first."""
    scores = [{"layer": layer, "error": round(error_with_float([layer]), 8)} for layer in layers]
    return sorted(scores, key=lambda s: s["error"])


def smallest_passing(ranked: Sequence[str], passes: Callable[[list[str]], bool],
                     limit: int) -> tuple[list[str] | None, int]:
    """The fewest of the most sensitive layers (a prefix of ``ranked``, at most ``limit``) whose float
    version passes; (None, trials) when even ``limit`` of them do not."""
    trials, low, high, k = 0, 0, None, 1
    while k <= limit:  # doubling: 1, 2, 4, ... up to the limit
        trials += 1
        if passes(list(ranked[:k])):
            high = k
            break
        low = k
        k = min(2 * k, limit) if k < limit else limit + 1
    if high is None:
        return None, trials
    while high - low > 1:  # bisect in (low, high]: low fails, high passes
        mid = (low + high) // 2
        trials += 1
        if passes(list(ranked[:mid])):
            high = mid
        else:
            low = mid
    return list(ranked[:high]), trials


def control_accuracy(layers: Sequence[str], error_with_float: Callable[[list[str]], float],
                     passes: Callable[[list[str]], bool], max_fraction: float = MAX_FRACTION) -> ControlResult:
    """Rank ``layers`` by sensitivity and keep the fewest most sensitive ones in float that pass.

    Args:
        layers: the quantized layers (node names).
        error_with_float: the output error against FP32 of the model quantized with these layers in float.
        passes: whether the model quantized with these layers in float is within the accuracy budget
            (the caller keeps what it measured, to ship that model).
        max_fraction: the most layers to keep in float, as a fraction of ``layers``.
    """
    if not layers:
        return ControlResult([], False)
    sensitivity = rank_layers(layers, error_with_float)
    limit = max(1, int(len(layers) * max_fraction))
    kept, trials = smallest_passing([s["layer"] for s in sensitivity], passes, limit)
    log.info("accuracy control: %s after %d trials", f"{len(kept)} layers kept in float" if kept else "gave up",
             trials)
    return ControlResult(kept or [], kept is not None, sensitivity, trials)
