"""Measure catalog architectures for real on this machine with ONNX Runtime.

Latency does not depend on the values of the weights, so each architecture is built with random
weights, exported to ONNX once and cached (:func:`edgetl.zoo.onnx_cache.cached_catalog_onnx`).

These timings predict deployment, so each model is timed in its **steady state**: alone, warmed up,
then consecutive runs of the same model (:func:`edgetl.runtime.bench.benchmark`), as a deployed model
runs. Interleaving models round-robin (:func:`edgetl.runtime.bench.benchmark_interleaved`) is for
comparing candidates fairly under drift (export's precision choice); it leaves each model with cold
caches, and on a 2-core machine its minima ran 1.1-2.5x slower than steady state for small and medium
networks, a bias a predictor fitted on them inherits. The figure used is the minimum (or a low
percentile) over many runs: on a shared machine the median moves by up to 2x between runs while the
minimum is stable to about 10%.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetl.runtime.bench import BenchResult, benchmark, session_rss_mb
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import TensorRTRunner
from edgetl.zoo.catalog import get_card
from edgetl.zoo.onnx_cache import cached_catalog_onnx

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
    warmup: int = 5,
    progress: Callable[[int, int, str], None] | None = None,
    runtime: str = "onnxruntime",
    passes: int = 3,
) -> dict[str, Measurement]:
    """Time catalog architectures with ONNX Runtime on the CPU (or as FP16 TensorRT engines), each in its steady state.

    One model at a time: its session is loaded, run ``warmup`` times untimed, then consecutively, and released
    before the next model (not interleaved with the other models). This is done in ``passes`` passes over the
    models, each taking a share of the ``rounds`` runs, and the statistics are over all of them: a burst of load
    from another tenant that outlasts one block of runs then spoils one pass of that model, not all its runs.

    Args:
        models: catalog names or ids.
        resolution: one input size for all (default: each model's own).
        batch: the batch size.
        threads: ONNX Runtime intra-op threads (default: all cores).
        rounds: consecutive timed runs per model.
        warmup: untimed runs of the same model just before its timed runs.
        progress: called as ``progress(done, total, model)`` while models are exported.
        runtime: ``onnxruntime`` (CPU) or ``tensorrt`` (an FP16 engine built from each model here).
        passes: passes over the models; each model gets ``ceil(rounds / passes)`` consecutive timed runs per pass.

    Returns:
        A :class:`Measurement` per model name, keyed as given.
    """
    sizes = {name: int(resolution or get_card(name).resolution) for name in models}
    onnx = {}
    for i, name in enumerate(models):
        if progress:
            progress(i, len(models), name)
        onnx[name] = architecture_onnx(name, sizes[name])
    if progress:
        progress(len(models), len(models), "timing")
    times: dict[str, list[float]] = {name: [] for name in models}
    per_pass = -(-rounds // max(1, passes))
    for _ in range(max(1, passes)):
        for name in models:
            runner = (TensorRTRunner(onnx[name], precision="fp16", max_batch=batch, opt_batch=batch, name=name)
                      if runtime == "tensorrt"
                      else OnnxRuntimeRunner(onnx[name], providers="cpu", threads=threads, name=name))
            res = sizes[name]
            # alone, warmed up, consecutive runs: the steady state a deployed model runs in
            result = benchmark(runner, (batch, 3, res, res), iterations=per_pass, warmup=warmup, cv_threshold=10.0)
            times[name] += [t / 1e3 for t in result.times_ms]
    return {name: _measurement(name, sizes[name], batch, BenchResult.from_times(
        times[name], name=name, backend=runtime, shape=(batch, 3, sizes[name], sizes[name]), warmup=warmup,
        cv_threshold=10.0), runtime, threads) for name in models}


def _measurement(name: str, resolution: int, batch: int, r: BenchResult, runtime: str,
                 threads: int | None) -> Measurement:
    return Measurement(
        model=name, resolution=resolution, batch=batch, min_ms=r.min, p10_ms=r.percentile(10), p50_ms=r.p50,
        cv=r.cv, runs=r.iterations, runtime=runtime, threads=threads or os.cpu_count(),
    )


def measure_memory(models: Sequence[str], resolution: int | None = None, threads: int | None = None,
                   runs: int = 3) -> dict[str, float]:
    """Peak RSS (MB) of an ONNX Runtime CPU session of each catalog architecture, each in a fresh process
    (:func:`session_rss_mb`): load, then ``runs`` inferences at batch 1."""
    out = {}
    for name in models:
        res = int(resolution or get_card(name).resolution)
        out[name] = session_rss_mb(architecture_onnx(name, res), (1, 3, res, res), threads, runs)
    return out
