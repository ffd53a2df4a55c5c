"""The metrics of a run: the Wilson score interval against published values, and the per-split report."""

from __future__ import annotations

import pytest

from edgetl.errors import ConfigError, EdgetlError
from edgetl.finetune.metrics import EvalResult, wilson_interval

# Published 95% Wilson score intervals (no continuity correction). Newcombe, "Two-sided confidence intervals
# for the single proportion: comparison of seven methods", Statistics in Medicine 17 (1998) 857-872, Table I,
# method 3 (four places); 8/10 and 0/10 to three places as the brief quotes them.
REFERENCE = [
    ((81, 263), (0.2553, 0.3662), 4),
    ((15, 148), (0.0624, 0.1605), 4),
    ((0, 20), (0.0, 0.1611), 4),
    ((1, 29), (0.0061, 0.1718), 4),
    ((8, 10), (0.490, 0.943), 3),
    ((0, 10), (0.0, 0.278), 3),
]


@pytest.mark.parametrize(("counts", "expected", "digits"), REFERENCE, ids=[f"{a}/{n}" for (a, n), _, _ in REFERENCE])
def test_wilson_interval_matches_published_values(counts, expected, digits):
    low, high = wilson_interval(*counts)
    assert (round(low, digits), round(high, digits)) == expected


def test_wilson_interval_edges():
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no images: nothing is known
    low95, high95 = wilson_interval(8, 10)
    low99, high99 = wilson_interval(8, 10, confidence=0.99)
    assert low99 < low95 and high99 > high95
    a, b = wilson_interval(80, 100)
    assert a > 0.49 and b < 0.943  # more images, a narrower interval around the same 80%


@pytest.mark.parametrize(("successes", "n", "confidence"), [(11, 10, 0.95), (-1, 10, 0.95), (3, 10, 1.0)])
def test_wilson_interval_refuses_nonsense(successes, n, confidence):
    with pytest.raises(ConfigError) as info:
        wilson_interval(successes, n, confidence)
    assert isinstance(info.value, EdgetlError)


def test_eval_result_reports_count_interval_and_per_class():
    result = EvalResult(loss=0.5, confusion=[[4, 1, 0], [0, 4, 0], [1, 0, 0]], images=10)
    doc = result.to_dict(["a", "b", "c"])
    assert doc["correct"] == 8 and doc["images"] == 10 and doc["accuracy"] == 0.8
    assert (round(doc["ci95"]["low"], 3), round(doc["ci95"]["high"], 3)) == (0.490, 0.943)
    assert doc["ci95"]["method"] == "wilson" and doc["ci95"]["confidence"] == 0.95
    assert doc["per_class_accuracy"] == {"a": 0.8, "b": 1.0, "c": 0.0}
    assert doc["per_class_images"] == {"a": 5, "b": 4, "c": 1}
