"""Measure catalog architectures for real on this machine with ONNX Runtime.

Latency does not depend on the values of the weights, so each architecture is built with random
weights, exported to ONNX once and cached (:func:`edgetl.onnx_cache.cached_catalog_onnx`). Models are then timed
round-robin (interleaved), and the figure used is the minimum over many runs: on a shared machine
the median moves by up to 2x between runs while the minimum is stable to about 10%.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetl.catalog import get_card
from edgetl.onnx_cache import cached_catalog_onnx
from edgetl.runtime.bench import benchmark_interleaved
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import TensorRTRunner

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """One architecture timed on this machine (milliseconds per batch)."""

    model: str
    resolution: int
    batch: int
    min_ms: float
    p10_ms: float
    p50_ms: float
    cv: float
    runs: int
    runtime: str = "onnxruntime"
    threads: int | None = None


def architecture_onnx(model: str, resolution: int | None = None) -> Path:
    """Return an ONNX file of a catalog architecture with random weights, exported once and cached."""
    return cached_catalog_onnx(model, resolution).path


def measure_models(
    models: Sequence[str],
    resolution: int | None = None,
    batch: int = 1,
    threads: int | None = None,
    rounds: int = 30,
    warmup: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
    runtime: str = "onnxruntime",
) -> dict[str, Measurement]:
    """Time catalog architectures with ONNX Runtime on the CPU (or as FP16 TensorRT engines), interleaved.

    Args:
        models: catalog names or ids.
        resolution: one input size for all (default: each model's own).
        batch: the batch size.
        threads: ONNX Runtime intra-op threads (default: all cores).
        rounds: timed runs per model (round-robin over the models).
        warmup: untimed runs per model first.
        progress: called as ``progress(done, total, model)`` while models are exported.
        runtime: ``onnxruntime`` (CPU) or ``tensorrt`` (an FP16 engine built from each model here).

    Returns:
        A :class:`Measurement` per model name, keyed as given.
    """
    runners = {}
    shapes = {}
    for i, name in enumerate(models):
        if progress:
            progress(i, len(models), name)
        res = int(resolution or get_card(name).resolution)
        onnx = architecture_onnx(name, res)
        runners[name] = (TensorRTRunner(onnx, precision="fp16", max_batch=batch, opt_batch=batch, name=name)
                         if runtime == "tensorrt"
                         else OnnxRuntimeRunner(onnx, providers="cpu", threads=threads, name=name))
        shapes[name] = (batch, 3, res, res)
    if progress:
        progress(len(models), len(models), "timing")
    results = benchmark_interleaved(runners, shapes, rounds=rounds, warmup=warmup, cv_threshold=10.0, settle=1)
    return {
        name: Measurement(
            model=name,
            resolution=shapes[name][2],
            batch=batch,
            min_ms=r.min,
            p10_ms=r.percentile(10),
            p50_ms=r.p50,
            cv=r.cv,
            runs=r.iterations,
            runtime=runtime,
            threads=threads or os.cpu_count(),
        )
        for name, r in results.items()
    }
