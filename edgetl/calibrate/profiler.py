"""Run ONNX files under ONNX Runtime's profiler, and plainly, in the windows of a :class:`NoiseGuard` run: the half
of kernel timing that only runs the files it is given.

It needs numpy and ONNX Runtime only (no torch, no ``onnx`` package), so that the same code times kernels on this
machine and on a board over SSH (:mod:`edgetl.board.host` ships it to the board's runner). What to run, the windows
of a calibration run and their ONNX files, is built by :mod:`edgetl.calibrate.kernel_plan`, which also reads what
the windows measured (:func:`run_windows` returns raw figures, plain JSON).

ONNX Runtime's profiler reports every kernel it runs with its op, its input and output shapes and its duration.
:func:`profile_onnx` runs a model in its steady state (alone, warmed up, consecutive runs) under the profiler and
keeps the kernels of its fastest run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.calibrate.noise import NoiseGuard
from edgetl.runtime.bench import benchmark, random_input
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner, session_options


@dataclass
class ProfiledRun:
    """A model run under ONNX Runtime's profiler in its steady state: its kernels, in graph order."""

    kernels: list[tuple[str, list[list[int]], list[list[int]], int, float]]  # op, inputs, outputs, param bytes, µs

    def samples(self, profiler_us: float = 0.0, block: int = 1) -> list[Any]:
        """The kernels as :class:`~edgetl.device.kernel_model.KernelSample` (layout reorders and views left out),
        each less the profiler's own cost ``profiler_us``. ``block``: see
        :func:`edgetl.device.kernel_model.blocked_channels`."""
        from edgetl.device.kernel_model import KernelSample, node_kernel  # host side only: not shipped to a board

        out = []
        for op, inputs, outputs, params, us in self.kernels:
            k = node_kernel(op, inputs, outputs, params, block)
            if k is not None:
                out.append(KernelSample(k[0], k[1], _less(us, profiler_us)))
        return out


def _less(us: float, profiler_us: float) -> float:
    """A profiled kernel's time less the profiler's own cost, kept at a fifth of the profiled time at least."""
    return max(us - profiler_us, 0.2 * us)


def _feeds(inputs: Sequence[tuple[str, Sequence[Any]]], shape: Sequence[int] | None) -> dict[str, np.ndarray]:
    """Random inputs: ``shape`` for a model's one input, else each input's own shape (a dynamic dimension as 1)."""
    if shape is not None:
        return {inputs[0][0]: random_input(shape)}
    return {name: random_input([d if isinstance(d, int) and d > 0 else 1 for d in dims], seed)
            for seed, (name, dims) in enumerate(inputs)}


def profile_onnx(model: str | os.PathLike[str] | bytes, feeds: Mapping[str, np.ndarray] | Sequence[int] | None,
                 threads: int | None, warmup: int = 5, runs: int = 10) -> ProfiledRun:
    """Run ``model`` ``warmup`` times, then ``runs`` times under ONNX Runtime's profiler, consecutively, and keep
    the kernels of the fastest run.

    ``feeds`` is the inputs, the shape of the model's one input, or None (every input at its own shape), filled
    with random values. The session is set up as every edgetl session is
    (:func:`edgetl.runtime.onnxruntime.session_options`), with the profiler on.
    """
    import onnxruntime as ort  # deferred: heavy

    with tempfile.TemporaryDirectory(prefix="edgetl-prof-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        if not isinstance(feeds, Mapping):
            feeds = _feeds([(i.name, i.shape) for i in session.get_inputs()], feeds)
        for _ in range(warmup + runs):
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    return _summarise(events, skip_runs=warmup)


def time_plain_us(model: str | os.PathLike[str] | bytes, feeds: Mapping[str, np.ndarray] | Sequence[int] | None,
                  threads: int | None, warmup: int = 5, runs: int = 30) -> float:
    """The fastest of ``runs`` consecutive runs of ``model`` after ``warmup``, without the profiler (µs); ``feeds``
    as :func:`profile_onnx` takes them."""
    with OnnxRuntimeRunner(model, providers="cpu", threads=threads, name="kernels") as runner:
        if not isinstance(feeds, Mapping):
            feeds = _feeds([(s.name, s.shape) for s in runner.input_specs()], feeds)
        return benchmark(runner, feed=feeds, iterations=runs, warmup=warmup, cv_threshold=10.0).min * 1e3


def _summarise(events: list[dict[str, Any]], skip_runs: int) -> ProfiledRun:
    """The kernels of the fastest whole run after the first ``skip_runs``, in graph order. Not each kernel's own
    fastest: those do not fall in one run, and their sum was 4-6% below the fastest whole run of the same model."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e.get("ts", 0))
    timed = runs[skip_runs:] or runs
    if not timed:
        return ProfiledRun([])
    fastest = min(timed, key=lambda e: float(e.get("dur", 0)))
    start, end = fastest["ts"], fastest["ts"] + fastest["dur"]
    kernels = []
    for e in sorted(events, key=lambda e: e.get("ts", 0)):
        if not _is_kernel(e) or not start <= e.get("ts", 0) <= end:
            continue
        args = e.get("args", {})
        kernels.append((str(args.get("op_name", "")), _shapes(args.get("input_type_shape")),
                        _shapes(args.get("output_type_shape")), int(args.get("parameter_size", 0) or 0),
                        float(e.get("dur", 0))))
    return ProfiledRun(kernels)


def _is_kernel(event: dict[str, Any]) -> bool:
    return event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")


def _shapes(items: Any) -> list[list[int]]:
    out = []
    for item in items or []:
        for dims in (item or {}).values():
            out.append([int(d) for d in dims])
    return out


# --- windows ------------------------------------------------------------------------------------------------


def run_window(window: Mapping[str, Any], model: Callable[[str], Any], threads: int | None) -> Any:
    """Run one window and return what it measured, as plain JSON.

    ``window["kind"]``:

    - ``profile``: the kernels of ``model`` run under the profiler (``warmup``, ``runs``, ``shape`` optional);
    - ``plain``: the fastest plain run of ``model`` (µs; ``warmup``, ``runs``, ``shape`` optional);
    - ``chains``: plain runs of two chains of identical kernels, ``model`` (the longer) and ``short``, and the
      longer under the profiler: ``{"long_us", "short_us", "kernels"}``.

    ``model`` maps the window's file keys to what ONNX Runtime loads (a path or bytes).
    """
    kind, counts = window["kind"], {k: int(window[k]) for k in ("warmup", "runs") if k in window}
    if kind == "profile":
        return profile_onnx(model(window["model"]), window.get("shape"), threads, **counts).kernels
    if kind == "plain":
        return time_plain_us(model(window["model"]), window.get("shape"), threads, **counts)
    if kind == "chains":
        return {"long_us": time_plain_us(model(window["model"]), None, threads),
                "short_us": time_plain_us(model(window["short"]), None, threads),
                "kernels": profile_onnx(model(window["model"]), None, threads, warmup=3, runs=10).kernels}
    raise ValueError(f"unknown window kind {kind!r}")


def run_windows(plan: Mapping[str, Any], model: Callable[[str], Any], threads: int | None) -> dict[str, Any]:
    """Run a calibration's windows (``plan``, as :meth:`edgetl.calibrate.kernel_plan.KernelPlan.job` writes it):
    those of ``before`` as they are, then those of ``windows`` each between two probes of the reference kernel
    (``reference``) in one :class:`~edgetl.calibrate.noise.NoiseGuard` run.

    Returns:
        ``before`` and ``windows`` (label -> what :func:`run_window` measured), and ``guard`` (its probes and
        counts, for :meth:`NoiseGuard.summary` and :func:`~edgetl.calibrate.noise.speed_factors`).
    """
    before = {label: run_window(w, model, threads) for label, w in plan["before"].items()}
    guard = NoiseGuard.for_reference(model(plan["reference"]), threads)
    windows = plan["windows"]
    done = guard.run_all({label: (lambda w=w: run_window(w, model, threads)) for label, w in windows.items()})
    return {"before": before, "windows": done, "guard": guard.state()}
