"""The latency-budget rule, one for export, validate and build.

A latency budget is judged on the device it is meant for:

- **on the target** (the profile describes this machine, see :meth:`DeviceProfile.is_this_machine`,
  and the measurement was made with the profile's runtime): on the measurement, at ``metric``;
- **elsewhere**: on the latency predicted for the device (:mod:`edgetl.device.latency`); the measurement
  made here is reported for information only, since a fast workstation must not pass a budget the
  device would miss, nor a slow one fail it;
- when the model cannot be traced, so there is no prediction: on the measurement here, and the
  verdict says so.

Percentiles are reported only where the number of runs supports them: the q-th percentile needs at
least ``100 / (100 - q)`` runs (p90: 10, p99: 100), else it is the maximum under another name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from edgetl.device.latency import predict_latency
from edgetl.device.schema import DeviceProfile
from edgetl.errors import ConfigError
from edgetl.options import REALTIME_FPS
from edgetl.zoo.model_cost import trace_model

log = logging.getLogger(__name__)

DEFAULT_METRIC = "p50"
"""The statistic a budget is judged on when nothing else is asked for."""
PERCENTILES = (25, 50, 90, 99)


def runs_needed(q: float) -> int:
    """The fewest runs whose ``q``-th percentile is not just their maximum: ``100 / (100 - q)``."""
    return math.ceil(100 / (100 - q) - 1e-9)


def latency_stats(result: Any) -> dict[str, Any]:
    """The statistics of a :class:`~edgetl.runtime.bench.BenchResult` that its number of runs supports (ms)."""
    n = int(result.iterations)
    stats: dict[str, Any] = {"min_ms": round(result.min, 4), "mean_ms": round(result.mean, 4),
                             "max_ms": round(result.max, 4)}
    for q in PERCENTILES:
        if n >= runs_needed(q):
            stats[f"p{q}_ms"] = round(result.percentile(q), 4)
    stats.update(cv=round(result.cv, 4), runs=n)
    omitted = [f"p{q}" for q in PERCENTILES if n < runs_needed(q)]
    if omitted:
        stats["omitted"] = f"{', '.join(omitted)}: {n} runs are too few (p{{q}} needs 100/(100-q) runs)"
    return stats


def check_metric(metric: str, runs: int, runs_option: str = "the runs", origin: str = "") -> None:
    """Refuse a budget metric that ``runs`` timed runs cannot estimate (p99 from 60 runs).

    Args:
        metric: ``min``, ``p50``, ``p90``...
        runs: the timed runs the judged measurement will have.
        runs_option: what sets them, for the message (``--rounds``, ``--iterations``).
        origin: where the metric came from when the user did not ask for it, for the message.
    """
    if metric.startswith("p") and runs < runs_needed(float(metric[1:])):
        raise ConfigError(f"a {metric} budget{origin} needs at least {runs_needed(float(metric[1:]))} timed runs; "
                          f"raise {runs_option} (got {runs}) or judge on p50 (--budget-metric p50)")


def realtime_budget(profile: DeviceProfile, batch: int = 1) -> tuple[float, str]:
    """The latency budget ``select`` ranks by when none is given: one frame per image at the profile's
    ``realtime_fps``, else at :data:`~edgetl.options.REALTIME_FPS` (a camera's 30 fps).

    Returns:
        The budget in ms for one inference of ``batch`` images (to 3 significant digits), and its basis: ``30 fps``,
        ``8 images at 30 fps``, ``15 fps, from the profile``.
    """
    stated = profile.realtime_fps
    fps = float(stated.value) if stated is not None else float(REALTIME_FPS)
    basis = f"{fps:g} fps" if batch == 1 else f"{batch} images at {fps:g} fps"
    return float(f"{1000.0 * batch / fps:.3g}"), basis + (", from the profile" if stated is not None else "")


def on_target(profile: DeviceProfile, runtime: str) -> bool:
    """Whether a measurement made here with ``runtime`` is a measurement on ``profile``'s device."""
    return runtime == profile.runtime and profile.is_this_machine()


def predicted_ms(model: Any, resolution: int | None, profile: DeviceProfile, precision: str) -> float | None:
    """The latency predicted for ``model`` (a catalog name or card) on ``profile`` at batch 1, or None
    when the device does not run ``precision`` or the model cannot be traced."""
    if not profile.supports(precision) or model is None:
        return None
    try:
        trace = trace_model(model, resolution)
    except Exception as exc:  # unknown model or untraceable architecture: a prediction is optional
        log.info("no latency prediction for %s: %s", model, exc)
        return None
    return float(predict_latency(trace, profile, precision, 1).latency_ms)


def layers_in_float(quantization: Mapping[str, Any] | None) -> tuple[int, int]:
    """How many of an INT8 model's quantized layers accuracy control kept in float, and how many it ranked.

    ``quantization`` is a manifest's ``quantization`` record (a candidate's): ``kept_in_float`` names the
    layers left in float, ``accuracy_control.sensitivity`` scores every layer that was quantized. A record
    without them (no accuracy control, an older manifest, or None) gives ``(0, 0)``.
    """
    quant = quantization if isinstance(quantization, Mapping) else {}
    control = quant.get("accuracy_control")
    kept = quant.get("kept_in_float")
    ranked = control.get("sensitivity") if isinstance(control, Mapping) else None
    return (len(kept) if isinstance(kept, list) else 0), (len(ranked) if isinstance(ranked, list) else 0)


def shipped_predicted_ms(model: Any, resolution: int | None, profile: DeviceProfile, precision: str,
                         quantization: Mapping[str, Any] | None = None) -> float | None:
    """The latency predicted on ``profile`` for a model as shipped: export's and validate's figure.

    As :func:`predicted_ms`, with one correction for an INT8 model in which accuracy control kept layers in
    float (:func:`layers_in_float` reads them from ``quantization``): those layers run at the FP32 rate, so
    their share of the quantized layers, by count, moves the INT8 figure towards FP32's. This is an
    approximation by layer count: the cost trace does not map ONNX nodes to its ops, so a large layer kept
    in float counts as much as a small one. Without such layers (or without an FP32 prediction) the figure
    is :func:`predicted_ms`'s.

    Args:
        model: a catalog name or card.
        resolution: the input size, or None for the card's.
        profile: the target device.
        precision: the shipped model's precision.
        quantization: the manifest's ``quantization`` record, or None.

    Returns:
        The predicted latency at batch 1 (ms), or None when there is no prediction.
    """
    ms = predicted_ms(model, resolution, profile, precision)
    kept, ranked = layers_in_float(quantization)
    if ms is None or not kept or not ranked:
        return ms
    fp32_ms = predicted_ms(model, resolution, profile, "fp32")
    return ms if fp32_ms is None else ms + (fp32_ms - ms) * kept / ranked


def judge_latency(profile: DeviceProfile, runtime: str, measured: Mapping[str, Any] | None,
                  predicted: float | None, budget_ms: float | None,
                  metric: str = DEFAULT_METRIC, measured_on: str | None = None) -> dict[str, Any]:
    """Judge a latency budget by the one rule (see the module's docstring).

    Args:
        profile: the target device.
        runtime: the runtime that made ``measured`` here (``onnxruntime``, ``tensorrt``).
        measured: statistics measured here (``p50_ms``, ``min_ms``...), or None.
        predicted: the latency predicted for the device (ms), or None.
        budget_ms: the budget, or None for none.
        metric: the statistic of a measurement on the target that is judged.
        measured_on: the board ``measured`` was made on (``ssh://...``): then it is a measurement on the target.

    Returns:
        ``basis`` (``measured on target``, ``predicted`` or ``measured here``), ``judged_on`` (a phrase),
        ``judged_ms``, ``budget_ms``, ``pass`` (None without a budget or a figure), ``failure``
        (a sentence, or None) and ``note`` (what the host's measurement means, or None).
    """
    target = measured_on is not None or on_target(profile, runtime)
    key = f"{metric}_ms"
    if target and measured and key in measured:
        basis, judged = "measured on target", float(measured[key])
        judged_on = (f"{metric} measured on the board {measured_on} ({runtime})" if measured_on
                     else f"{metric} measured on {profile.name} (this machine, {runtime})")
        note = None
    elif predicted is not None:
        basis, judged, judged_on = "predicted", float(predicted), f"predicted for {profile.name}"
        note = (f"this machine is not {profile.name} with {profile.runtime}: the measurement here "
                f"({runtime}) is for information only; the budget is judged on the prediction")
    elif measured and key in measured:
        basis, judged = "measured here", float(measured[key])
        judged_on = f"{metric} measured here with {runtime} (no prediction for {profile.name})"
        note = f"no latency prediction for {profile.name}: the budget is judged on the measurement here"
    else:
        basis, judged, judged_on, note = None, None, None, None
    passed = None if budget_ms is None or judged is None else bool(judged <= budget_ms)
    failure = (f"latency {judged:.4g} ms ({judged_on}) exceeds the budget of {budget_ms:g} ms"
               if passed is False else None)
    return {"on_target": target, "basis": basis, "budget_metric": metric, "judged_on": judged_on,
            "judged_ms": None if judged is None else round(judged, 4), "budget_ms": budget_ms,
            "pass": passed, "failure": failure, "note": note}
