"""Latency benchmarks of runners: percentiles, spread, throughput and peak memory.

Timings on a shared machine are noisy: other tenants take the cores and the median of one model can
move by 2x between runs. So:

- :func:`benchmark` times one runner after a warm-up and reports the coefficient of variation (CV);
  above 10% the result is flagged ``unstable`` and a warning is logged, as trtexec does. This is the
  steady state a deployed model runs in (the same model, warmed up, run after run): use it for any
  latency meant to predict deployment (calibrate, ``select --measure``, validate, a TensorRT engine).
- :func:`benchmark_interleaved` times several runners round-robin, in a shuffled order each round,
  so a burst of load hits every model alike; an untimed settle run at the start of each block keeps
  the previous session's spinning threads out of the timings. Use it only to *compare* candidates
  against each other (export's precision choice): each model then runs with caches the others
  evicted, and small networks ran 1.1-2.5x slower than in their steady state, so these figures are
  not a deployment latency. Compare on ``min`` or a low percentile (``result.percentile(10)``), not
  on one model's median.

Python's garbage collector is paused while timing (as :mod:`timeit` does).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import ConfigError
from edgetl.runtime.base import Runner

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (1, 3, 224, 224)
CV_THRESHOLD = 0.1

Shape = Sequence[int]


@dataclass(frozen=True)
class BenchResult:
    """Latency statistics of one runner, in milliseconds.

    Attributes:
        name: the runner's name.
        backend: ``onnxruntime``, ``torch`` or ``tensorrt``.
        shape: the input shape (NCHW).
        batch: images per inference (``shape[0]``).
        iterations: timed inferences.
        warmup: untimed inferences before them.
        p50, p90, p99, mean, min, max, std: latency statistics (ms).
        cv: coefficient of variation, ``std / mean``.
        throughput: images per second, ``batch / mean``.
        peak_rss_mb: the process's peak resident memory while the benchmark ran (MB). On Linux the
            high-water mark is reset when the benchmark starts; elsewhere it is the peak since the
            process started.
        unstable: ``cv`` is above the threshold (10%): the figures are noisy.
        times_ms: every timed latency, in the order measured.
    """

    name: str
    backend: str
    shape: tuple[int, ...]
    batch: int
    iterations: int
    warmup: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    std: float
    cv: float
    throughput: float
    peak_rss_mb: float
    unstable: bool
    times_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_times(
        cls,
        times_s: Sequence[float],
        *,
        name: str = "",
        backend: str = "",
        shape: Shape = DEFAULT_SHAPE,
        warmup: int = 0,
        peak_rss_mb: float = 0.0,
        cv_threshold: float = CV_THRESHOLD,
    ) -> BenchResult:
        """Summarise latencies given in seconds."""
        if len(times_s) == 0:
            raise ConfigError("no timings to summarise; run at least one iteration")
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if ms.size > 1 else 0.0
        cv = std / mean if mean > 0 else 0.0
        shape = tuple(int(d) for d in shape)
        batch = shape[0] if shape else 1
        return cls(
            name=name,
            backend=backend,
            shape=shape,
            batch=batch,
            iterations=int(ms.size),
            warmup=warmup,
            p50=p50,
            p90=p90,
            p99=p99,
            mean=mean,
            min=float(ms.min()),
            max=float(ms.max()),
            std=std,
            cv=cv,
            throughput=batch / (mean / 1e3) if mean > 0 else float("inf"),
            peak_rss_mb=peak_rss_mb,
            unstable=cv > cv_threshold,
            times_ms=tuple(float(v) for v in ms),
        )

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the latencies, in ms (e.g. ``percentile(10)``)."""
        if not 0 <= q <= 100:
            raise ConfigError(f"a percentile is between 0 and 100, got {q}")
        return float(np.percentile(np.asarray(self.times_ms), q))

    def to_dict(self, include_times: bool = False) -> dict[str, Any]:
        """A JSON-friendly dict; latencies in ms, rounded to microseconds."""
        d: dict[str, Any] = {
            "name": self.name,
            "backend": self.backend,
            "shape": list(self.shape),
            "batch": self.batch,
            "iterations": self.iterations,
            "warmup": self.warmup,
        }
        for key in ("p50", "p90", "p99", "mean", "min", "max", "std"):
            d[f"{key}_ms"] = round(getattr(self, key), 4)
        d["cv"] = round(self.cv, 4)
        d["throughput"] = round(self.throughput, 2)
        d["peak_rss_mb"] = round(self.peak_rss_mb, 1)
        d["unstable"] = self.unstable
        if include_times:
            d["times_ms"] = [round(t, 4) for t in self.times_ms]
        return d


# --- memory ------------------------------------------------------------------------------------

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_mb() -> float | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark to its current RSS (Linux ``clear_refs``); False elsewhere."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The process's peak resident set size in MB (``VmHWM``, else ``getrusage().ru_maxrss``)."""
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


# Run in a fresh interpreter, so no earlier allocation's freed-but-kept heap hides this session's growth (or
# inflates it). The baseline is taken with onnxruntime imported and before the session exists: what validate
# reports as the runtime's memory (``runtime_mb``) and calibrate fits. The session is set up as
# OnnxRuntimeRunner sets it up.
_RSS_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort

def kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

path, threads, runs, shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = np.random.default_rng(0).standard_normal(tuple(int(d) for d in shape.split("x")), dtype=np.float32)
before = kb("VmRSS:")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
o = ort.SessionOptions()
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
if threads > 0:
    o.intra_op_num_threads = threads
o.inter_op_num_threads = 1
o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
o.log_severity_level = 3
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
feed = {s.get_inputs()[0].name: x}
for _ in range(runs):
    s.run(None, feed)
print(kb("VmHWM:") - before)
"""


def session_rss_mb(onnx: str | os.PathLike[str], shape: Sequence[int], threads: int | None = None,
                   runs: int = 3) -> float:
    """Peak RSS an ONNX Runtime CPU session adds to a process, in MB (1e6 bytes): load ``onnx`` and run it
    ``runs`` times in a fresh Python process, from the RSS before the session to the peak after (Linux)."""
    if not Path("/proc/self/status").is_file():
        raise ConfigError("measuring a session's peak RSS needs Linux's /proc/self/status")
    args = [sys.executable, "-c", _RSS_SCRIPT, str(onnx), str(threads or 0), str(runs),
            "x".join(str(int(d)) for d in shape)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"measuring the memory of {onnx} failed: {tail}")
    return int(done.stdout.split()[-1]) * 1024 / 1e6



# --- the machine: memory bandwidth, BLAS rate, the runtime's own memory (calibrate; the board runner) -----------


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measure memory bandwidth in GB/s: the best of ``repeats`` copies of a large array (read + write)."""
    n = megabytes * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def measure_gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measure attainable fp32 GFLOP/s on every core: the best of ``repeats`` n x n SGEMMs in NumPy's BLAS."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def session_growth_mb(model: bytes | str | os.PathLike[str]) -> float:
    """RSS growth (MB, at least 1) of creating an ONNX Runtime CPU session of ``model`` in this process and running
    it once on ones (its input shape must be fixed); for a tiny model, the runtime's own memory."""
    import onnxruntime as ort  # deferred: heavy

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    before = rss_mb()
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    session.run(None, {first.name: np.ones([int(d) for d in first.shape], np.float32)})
    return max(1.0, rss_mb() - before)

# --- timing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def random_input(shape: Shape, seed: int = 0) -> np.ndarray:
    """A standard-normal float32 NCHW batch (normalised images look like this to a network)."""
    _check_shape(shape)
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def _check_shape(shape: Shape) -> None:
    if len(shape) == 0 or any(int(d) < 1 for d in shape):
        raise ConfigError(f"input shape must be positive dimensions such as (1, 3, 224, 224), got {tuple(shape)}")


def _check_counts(iterations: int, warmup: int) -> None:
    if iterations < 1:
        raise ConfigError(f"iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise ConfigError(f"warmup must be 0 or more, got {warmup}")


def _warn_unstable(result: BenchResult, threshold: float) -> None:
    if result.unstable:
        log.warning(
            "%s: timings are unstable (CV %.0f%% > %.0f%%): the machine is busy or throttling; "
            "trust min (%.3f ms) or a low percentile, or run more iterations",
            result.name, 100 * result.cv, 100 * threshold, result.min,
        )


def benchmark(
    runner: Runner,
    shape: Shape = DEFAULT_SHAPE,
    iterations: int = 100,
    warmup: int = 10,
    feed: Mapping[str, np.ndarray] | np.ndarray | None = None,
    seed: int = 0,
    cv_threshold: float = CV_THRESHOLD,
) -> BenchResult:
    """Time ``iterations`` inferences of a runner after ``warmup`` untimed ones.

    An inactive runner is activated for the benchmark (its load counts towards the peak memory) and
    deactivated afterwards; an active one is left active.

    Args:
        runner: any :class:`~edgetl.runtime.base.Runner`.
        shape: the NCHW input shape; the batch is ``shape[0]``.
        iterations: timed inferences.
        warmup: untimed inferences first (allocations, kernel selection, caches).
        feed: the input to use instead of random data of ``shape``.
        seed: seed of the random input.
        cv_threshold: the CV above which the result is flagged unstable and a warning is logged.

    Returns:
        The latency statistics.
    """
    _check_counts(iterations, warmup)
    if feed is None:
        feed = random_input(shape, seed)
    elif isinstance(feed, np.ndarray):
        shape = feed.shape
    else:
        feed = dict(feed)
        shape = next(iter(feed.values())).shape
    reset_peak_rss()
    with _activated([runner]):
        for _ in range(warmup):
            runner.infer(feed)
        times: list[float] = []
        with _gc_paused():
            for _ in range(iterations):
                runner.infer(feed)
                times.append(runner.inference_times[-1])
    return _summary(times, runner.name, runner.backend, shape, warmup, peak_rss_mb(), cv_threshold)


def benchmark_interleaved(
    runners: Mapping[str, Runner],
    shape: Shape | Mapping[str, Shape] = DEFAULT_SHAPE,
    rounds: int = 30,
    iterations_per_round: int = 1,
    warmup: int = 5,
    shuffle: bool = True,
    seed: int = 0,
    cv_threshold: float = CV_THRESHOLD,
    settle: int = 0,
) -> dict[str, BenchResult]:
    """Time several runners round-robin, so that load on a shared machine hits them all alike.

    For comparing candidates against each other only; a latency that predicts deployment comes from
    :func:`benchmark` (steady state).

    Every runner is activated and warmed up first. Then each round runs every runner
    ``iterations_per_round`` times, in a fresh random order per round (``shuffle``) or in a rotating
    order, so that no model always runs right after the same neighbour.

    After a run, ONNX Runtime's intra-op threads spin for a while waiting for more work, and they
    compete for the cores with whichever session runs next: on 2 cores that doubled the time of a
    ResNet-18 run that directly followed another model. ``settle`` untimed runs at the start of each
    block absorb that hand-over, so the timed runs see what consecutive runs see.

    Args:
        runners: runners by label (the label names the result).
        shape: one NCHW shape for all, or a shape per label (models at their own resolution).
        rounds: how many rounds; each runner gets ``rounds * iterations_per_round`` timed runs.
        iterations_per_round: consecutive runs of one runner within a round.
        warmup: untimed runs per runner before the first round.
        shuffle: randomise the order in each round (seeded); otherwise rotate it.
        seed: seed of the order and of the random inputs.
        cv_threshold: the CV above which a result is flagged unstable.
        settle: untimed runs of a runner before its timed runs in each round.

    Returns:
        A :class:`BenchResult` per label; ``peak_rss_mb`` is the process's peak over the whole run.
    """
    _check_interleaved(runners, rounds, iterations_per_round, warmup, settle)
    labels = list(runners)
    shapes = _shapes_by_label(shape, labels)
    feeds = {label: random_input(shapes[label], seed) for label in labels}
    reset_peak_rss()
    with _activated(list(runners.values())):
        for label in labels:
            for _ in range(warmup):
                runners[label].infer(feeds[label])
        times = _timed_rounds(runners, feeds, rounds, iterations_per_round, shuffle, seed, settle)
    peak = peak_rss_mb()
    return {
        label: _summary(times[label], label, runners[label].backend, shapes[label], warmup, peak, cv_threshold)
        for label in labels
    }


def _check_interleaved(runners: Mapping[str, Runner], rounds: int, iterations_per_round: int, warmup: int,
                       settle: int) -> None:
    if not runners:
        raise ConfigError("benchmark_interleaved needs at least one runner")
    if settle < 0:
        raise ConfigError("settle must be >= 0")
    _check_counts(rounds * iterations_per_round, warmup)
    if rounds < 1 or iterations_per_round < 1:
        raise ConfigError("rounds and iterations_per_round must be at least 1")


def _shapes_by_label(shape: Shape | Mapping[str, Shape], labels: list[str]) -> dict[str, tuple[int, ...]]:
    if not isinstance(shape, Mapping):
        return {label: tuple(shape) for label in labels}
    missing = [label for label in labels if label not in shape]
    if missing:
        raise ConfigError(f"no input shape given for {', '.join(missing)}")
    return {label: tuple(shape[label]) for label in labels}


def _timed_rounds(runners: Mapping[str, Runner], feeds: Mapping[str, np.ndarray], rounds: int,
                  iterations_per_round: int, shuffle: bool, seed: int, settle: int) -> dict[str, list[float]]:
    """Run the rounds with the garbage collector paused; return each runner's timed latencies (s)."""
    labels = list(runners)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {label: [] for label in labels}
    with _gc_paused():
        for r in range(rounds):
            if shuffle:
                order = [labels[i] for i in rng.permutation(len(labels))]
            else:
                order = labels[r % len(labels):] + labels[: r % len(labels)]
            for label in order:
                runner = runners[label]
                for _ in range(settle):
                    runner.infer(feeds[label])
                for _ in range(iterations_per_round):
                    runner.infer(feeds[label])
                    times[label].append(runner.inference_times[-1])
    return times


def _summary(times: list[float], name: str, backend: str, shape: Shape, warmup: int, peak_mb: float,
             cv_threshold: float) -> BenchResult:
    """The statistics of one runner's latencies, with a warning when they are unstable."""
    result = BenchResult.from_times(
        times, name=name, backend=backend, shape=shape, warmup=warmup, peak_rss_mb=peak_mb,
        cv_threshold=cv_threshold,
    )
    _warn_unstable(result, cv_threshold)
    return result


@contextlib.contextmanager
def _activated(runners: Sequence[Runner]) -> Iterator[None]:
    """Activate the inactive runners for the block, then deactivate just those."""
    started: list[Runner] = []
    try:
        for runner in runners:
            if not runner.is_active:
                runner.activate()
                started.append(runner)
        yield
    finally:
        for runner in reversed(started):
            runner.deactivate()


# --- files -------------------------------------------------------------------------------------


def onnx_input_shape(
    path: str | Path, batch: int | None = None, resolution: int | None = None
) -> tuple[int, int, int, int]:
    """The NCHW input shape to feed an ONNX file, from its graph and the sizes asked for.

    A fixed dimension is used as it is (asking for another size is an error); a dynamic batch
    defaults to 1; a dynamic height/width needs ``resolution``.

    Raises:
        ConfigError: the model's input is not NCHW, or conflicts with ``batch``/``resolution``.
    """
    import onnx  # deferred: heavy

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ConfigError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(f"{path} has {len(inputs)} inputs; edgetl benchmarks single-input image models")
    dims = [d.dim_value if d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ConfigError(f"{path}'s input '{inputs[0].name}' has {len(dims)} dimensions; expected NCHW")
    n, c, h, w = dims
    if c is None:
        raise ConfigError(f"{path}'s input has a dynamic channel dimension; export it with a fixed one")
    if batch is not None and n is not None and batch != n:
        raise ConfigError(f"{path} has a fixed batch of {n}; use --batch {n} or export with a dynamic batch")
    if resolution is not None and h is not None and w is not None and (h, w) != (resolution, resolution):
        raise ConfigError(f"{path} takes {h}x{w} images; drop --resolution or re-export at {resolution}")
    if h is None or w is None:
        if resolution is None:
            raise ConfigError(f"{path} has a dynamic image size; pass --resolution")
        h, w = h or resolution, w or resolution
    return (n or batch or 1, c, h, w)
