"""Noise-aware timing: a fixed reference kernel timed between the windows of a calibration run.

On a shared machine another tenant can slow every kernel for a while. Calibration then writes a profile that is
shifted by that load, silently. :class:`NoiseGuard` runs a fixed micro-graph (:data:`REFERENCE_CONV`, a chain of
3x3 convolutions in its own session) before and after every *window* of the run (one profiled model, one
micro-graph, one overhead measurement). The reference's *level* at a point of the run is the median of the
:data:`LEVEL_SPAN` probes around it (it follows load that lasts, not a single slowed probe), and its *quiet level*
the :data:`QUIET_PERCENTILE`-th percentile of its levels over the run (:func:`quiet_level`): what the machine does
when other tenants leave it alone, and a figure two runs agree on (the single quietest probe is an extreme value:
two runs in a row here put it 8% apart, their quiet levels 1.4%). A window where the reference was more than
:data:`DRIFT_THRESHOLD` slower than the quiet level, before or after it, is timed again in a later pass (a burst of
load may have passed by then), up to :data:`RETRIES` more passes, keeping its least drifted attempt. Every
window's times are then scaled to the quiet level (:func:`speed_factors`). :meth:`NoiseGuard.summary` gives what the
profile records: the coefficient of variation of the reference, its drift from the quiet level, and how many
windows were repeated or drifted on every try; :attr:`NoiseSummary.noisy` says when the machine was too noisy to
calibrate. It also reads what other processes took of the cores the run needed (:func:`cpu_use`, from Linux's
``/proc/stat``): a steady load, such as one busy core, slows the reference as much at its quietest as anywhere, so
the probes alone would not see it.

The guard needs numpy and ONNX Runtime only: it runs on a board too (``device calibrate --on``), with the reference
model built here (:func:`edgetl.calibrate.kernel_timing.reference_model`) and shipped there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: How far the reference kernel may be slower than its quiet level (a fraction) before the window around it
#: counts as drifted: timed again, keeping the least drifted attempt.
DRIFT_THRESHOLD = 0.10
#: How many more times a drifted window is timed.
RETRIES = 2
#: A later pass is run only when at most this share of the windows drifted: beyond it the load is not a burst
#: but the state of the machine, and timing every window again would triple the run to no end (the run is then
#: too noisy).
RETRY_MAX_SHARE = 0.5
#: The share of windows that drifted on every try, or of reference probes beyond :data:`DRIFT_THRESHOLD`,
#: above which the machine was too noisy to calibrate.
NOISY_SHARE = 0.10
#: The share of the cores the run's threads need that other processes (or the hypervisor, as steal) took on average,
#: above which the machine was too noisy to calibrate (see :func:`cpu_use`): one busy core of two, with two threads,
#: takes half.
TAKEN_SHARE = 0.10
#: The reference kernel: a chain of ``length`` 3x3 convolutions of ``channels`` channels on a ``size`` x ``size``
#: input (same padding): a few milliseconds a run, as long as the kernels and models it watches over. A shorter one
#: (0.1-1 ms) ran unslowed while other processes slowed 10 ms kernels 2.5x: the scheduler favours short bursts.
REFERENCE_CONV = (64, 56, 4)
#: How many consecutive probes give the reference's level at a point of the run (their median; see
#: :func:`speed_factors`).
LEVEL_SPAN = 11
#: The percentile of the reference's levels over a run that is its quiet level (see :func:`quiet_level`).
QUIET_PERCENTILE = 10
#: Runs of the reference per probe; a probe is the fastest of them, as calibration keeps each kernel's fastest run
#: (on 2 shared cores, the probes are bimodal: both cores, or one taken by another process and about 2x slower).
REFERENCE_RUNS = 3


class ReferenceKernel:
    """The reference kernel (an ONNX model: :func:`edgetl.calibrate.kernel_timing.reference_model`, a file or its
    bytes) in its own ONNX Runtime session (set up as every edgetl session is), on a random input."""

    def __init__(self, model: str | os.PathLike[str] | bytes, threads: int | None, runs: int = REFERENCE_RUNS
                 ) -> None:
        import onnxruntime as ort  # deferred: heavy

        from edgetl.runtime.bench import random_input
        from edgetl.runtime.onnxruntime import session_options

        self._session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                             sess_options=session_options(threads), providers=["CPUExecutionProvider"])
        first = self._session.get_inputs()[0]
        self._feeds = {first.name: random_input(first.shape)}
        self._runs = runs
        for _ in range(3):
            self._session.run(None, self._feeds)

    def time_us(self) -> float:
        """The fastest of a few consecutive runs, in microseconds (as calibration keeps each kernel's fastest run)."""
        times = []
        for _ in range(self._runs):
            t0 = time.perf_counter()
            self._session.run(None, self._feeds)
            times.append(time.perf_counter() - t0)
        return min(times) * 1e6


@dataclass(frozen=True)
class NoiseSummary:
    """How steady the machine was during a calibration run.

    Attributes:
        reference_us: the reference kernel's quiet level (µs, :func:`quiet_level`), drift is measured from.
        cv: coefficient of variation of the reference's probes over the run.
        drift_median: median of (probe / baseline - 1) over the run.
        drift_max: the largest (probe / baseline - 1).
        over: share of probes beyond :data:`DRIFT_THRESHOLD`.
        windows: windows timed; ``repeated``: those timed again; ``drifted``: the labels of those that drifted on
            every try (kept at their least drifted attempt, scaled; see :meth:`NoiseGuard.run_all`).
        cpu: what other processes took of the cores while the run went on (:func:`cpu_use`); None where it cannot
            be read (not Linux).
        passes: how far the calibration models' whole runs sat above their fastest pass (the median over the
            models of their median pass over their fastest, less 1): how often another tenant slowed the machine
            where the reference may not have seen it. Recorded, not warned about: the fastest pass is kept, and two
            calibrations whose passes sat 6.1% and 14.6% above it agreed within 5% for 92% of the catalog. None
            when they were not timed in passes.
    """

    reference_us: float
    cv: float
    drift_median: float
    drift_max: float
    over: float
    windows: int
    repeated: int
    drifted: tuple[str, ...]
    cpu: CpuUse | None = None
    passes: float | None = None

    @property
    def noisy(self) -> bool:
        """Whether the machine was too noisy to calibrate (see :data:`NOISY_SHARE` and :data:`TAKEN_SHARE`)."""
        return bool(self.over > NOISY_SHARE or len(self.drifted) > NOISY_SHARE * max(1, self.windows)
                    or self._loaded())

    def _loaded(self) -> bool:
        return self.cpu is not None and self.cpu.taken > TAKEN_SHARE

    def text(self) -> str:
        """The figures as the profile's ``derived`` text records them."""
        return (f"a reference (a chain of {REFERENCE_CONV[2]} 3x3 convolutions, {REFERENCE_CONV[0]} channels, "
                f"{REFERENCE_CONV[1]} px, "
                f"{self.reference_us:.0f} us at its quiet level) was timed between the {self.windows} windows of the "
                f"run: its coefficient of variation {self.cv:.3f}, drift from its quiet level "
                f"{100 * self.drift_median:+.1f}% (median), at most {100 * self.drift_max:+.1f}%, "
                f"{100 * self.over:.0f}% of probes beyond {100 * DRIFT_THRESHOLD:.0f}%; {self.repeated} windows "
                f"timed again, {len(self.drifted)} drifted on every try" + (f"; {self.cpu.text()}" if self.cpu else "")
                + (f"; the calibration models' whole runs, timed in passes through the run, came out a median "
                   f"{100 * self.passes:+.1f}% above their fastest pass" if self.passes is not None else ""))

    def warning(self) -> str:
        """One line that says the machine was too noisy, with the figures (first, what other processes took of the
        cores, when that was over :data:`TAKEN_SHARE`)."""
        named = f"{self.cpu.text()}; " if self.cpu is not None and self._loaded() else ""
        return (f"the machine was too noisy to calibrate: {named}a reference kernel ran "
                f"up to {100 * self.drift_max:+.0f}% slower than its quiet level (CV {self.cv:.2f}, "
                f"{100 * self.over:.0f}% of probes beyond {100 * DRIFT_THRESHOLD:.0f}%, {len(self.drifted)} of "
                f"{self.windows} windows drifted on every try); the profile may be shifted: calibrate again when the "
                "machine is quiet")

    @classmethod
    def of(cls, state: dict[str, Any]) -> NoiseSummary:
        """The figures of a guard's run from its :meth:`NoiseGuard.state` (here or on a board)."""
        probes = np.asarray(state["probes"] or [1.0], dtype=np.float64)
        base = quiet_level(probes)
        drift = probes / base - 1
        return cls(base, float(probes.std() / probes.mean()), float(np.median(drift)), float(drift.max()),
                   float((drift > state["threshold"]).mean()), int(state["windows"]), int(state["repeated"]),
                   tuple(state["drifted"]), CpuUse(**state["cpu"]) if state.get("cpu") else None)

    def to_dict(self) -> dict[str, Any]:
        """The figures, rounded, for JSON output."""
        return {"reference_us": round(self.reference_us, 1), "cv": round(self.cv, 4),
                "drift_median": round(self.drift_median, 4), "drift_max": round(self.drift_max, 4),
                "over_threshold": round(self.over, 4), "windows": self.windows, "repeated": self.repeated,
                "drifted": len(self.drifted), "noisy": self.noisy,
                "cpu": self.cpu.to_dict() if self.cpu else None,
                "passes": round(self.passes, 4) if self.passes is not None else None}


@dataclass
class NoiseGuard:
    """Times a reference kernel around every window of a run, and repeats or drops the windows where it drifted.

    ``probe`` times the reference (µs); :meth:`start` takes a few probes before the first window, and reads the
    cores' counters that :func:`cpu_use` compares with at the end (``threads``: the run's intra-op threads, default
    every core it may use).
    """

    probe: Callable[[], float]
    threads: int | None = None
    threshold: float = DRIFT_THRESHOLD
    retries: int = RETRIES
    probes: list[float] = field(default_factory=list)
    windows: int = 0
    repeated: int = 0
    drifted: list[str] = field(default_factory=list)
    at: dict[str, int] = field(default_factory=dict)
    counters: CpuCounters | None = None

    @classmethod
    def for_reference(cls, model: str | os.PathLike[str] | bytes, threads: int | None) -> NoiseGuard:
        """A guard whose reference kernel is ``model`` (see :class:`ReferenceKernel`) run with ``threads`` intra-op
        threads, started."""
        return cls(ReferenceKernel(model, threads).time_us, threads).start()

    def start(self, probes: int = 5) -> NoiseGuard:
        """Read the cores' counters, and take ``probes`` probes of the reference, so the first window has a
        baseline."""
        self.counters = CpuCounters.read()
        for _ in range(probes):
            self._probe()
        return self

    def _probe(self) -> float:
        us = self.probe()
        self.probes.append(us)
        return us

    def _attempt(self, window: Callable[[], T]) -> tuple[T, float, int]:
        """Run ``window`` between two probes; its result, the slower of the two probes (µs), and the index of the
        probe after it."""
        before = self.probes[-1] if self.probes else self._probe()
        result = window()
        return result, max(before, self._probe()), len(self.probes) - 1

    def run_all(self, windows: dict[str, Callable[[], T]]) -> dict[str, T]:
        """Run every window once, each between two probes of the reference; then run those where the reference
        drifted again, in a later pass (load from another tenant may have passed by then), up to :attr:`retries`
        passes, while at most :data:`RETRY_MAX_SHARE` of the windows drifted. Drift is judged against the quiet
        level of the probes so far when a pass ends, so a window timed while the first probes were slowed too is
        caught once the machine is quiet.

        Returns:
            Each window's result, in the order given: its least drifted attempt, which :func:`speed_factors` scales
            to the quiet level. None is left out: leaving out the windows that drifted on every try changed which
            kernels the fit saw from one calibration to the next (a run that left out 135 kernel samples predicted the
            largest RegNets 1.4x slower than the next run, which kept them); they are counted in the summary.
        """
        best: dict[str, tuple[T, float, int]] = {}
        todo, retried = list(windows), set()
        for attempt in range(1 + self.retries):
            for label in todo:
                tried = self._attempt(windows[label])
                if label not in best or tried[1] < best[label][1]:
                    best[label] = tried
            base = quiet_level(self.probes)
            todo = [label for label in windows if best[label][1] / base - 1 > self.threshold]
            if not todo or attempt == self.retries or len(todo) > RETRY_MAX_SHARE * len(windows):
                break
            retried.update(todo)
        self.windows += len(windows)
        self.repeated += len(retried)
        self.drifted += todo
        self.at.update({label: best[label][2] for label in windows})
        return {label: best[label][0] for label in windows}

    def state(self) -> dict[str, Any]:
        """The probes and counts so far, as plain JSON (what a board sends back; see :meth:`NoiseSummary.of`)."""
        use = cpu_use(self.counters, CpuCounters.read(), self.threads)
        return {"probes": list(self.probes), "threshold": self.threshold, "windows": self.windows,
                "repeated": self.repeated, "drifted": list(self.drifted),
                "at": dict(self.at), "cpu": use.to_dict() if use else None}

    def summary(self) -> NoiseSummary:
        """The figures of the run so far (relative to the quiet level of the whole run)."""
        return NoiseSummary.of(self.state())


def levels(probes: Any) -> np.ndarray:
    """The reference's level at each probe: the median of the :data:`LEVEL_SPAN` probes around it."""
    p = np.asarray(probes, dtype=np.float64)
    half = LEVEL_SPAN // 2
    return np.array([np.median(p[max(0, i - half): i + half + 1]) for i in range(len(p))])


def quiet_level(probes: Any) -> float:
    """The reference's quiet level (µs): the :data:`QUIET_PERCENTILE`-th percentile of its :func:`levels`."""
    return _quiet(levels(probes)) if len(probes) else 1.0


def _quiet(level: np.ndarray) -> float:
    return float(np.percentile(level, QUIET_PERCENTILE))


def speed_factors(state: dict[str, Any]) -> dict[str, float]:
    """Each window's factor to the machine at its quiet level, from a guard's :meth:`NoiseGuard.state`: the quiet
    level over the reference's level after the window's kept attempt (1 where the machine ran at its quiet level,
    0.9 where the reference ran 11% slower). Times measured in the window, multiplied by it, are what the quiet
    machine would have measured, where load that lasts slows the window's kernels as it slows the reference (they
    share its cores, caches and memory); a burst that slowed one probe leaves the level, and so the factor, alone.
    """
    level = levels(state["probes"])
    base = _quiet(level)
    return {label: base / float(level[i]) for label, i in state.get("at", {}).items()}


@dataclass(frozen=True)
class CpuCounters:
    """Linux's counters, in seconds, of the cores this process may run on (``/proc/stat``): their busy time and the
    time the hypervisor gave them to other guests (steal); this process's own CPU time; and the wall clock."""

    busy: float
    steal: float
    own: float
    wall: float
    cores: int

    @classmethod
    def read(cls) -> CpuCounters | None:
        """The counters now; None where ``/proc/stat`` cannot be read (not Linux)."""
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        ticks = np.array([[int(v) for v in (line.split()[1:9] + ["0"] * 8)[:8]] for line in lines
                          if line.split(maxsplit=1)[0] in mine], dtype=np.float64).reshape(-1, 8).sum(axis=0)
        user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks / os.sysconf("SC_CLK_TCK")).tolist()
        own = os.times()
        return cls(user + nice + system + irq + softirq, steal, own.user + own.system, time.monotonic(), len(mine))


@dataclass(frozen=True)
class CpuUse:
    """What other processes took of the cores during a run (from two :class:`CpuCounters`).

    Attributes:
        others: cores other processes kept busy, on average (their busy time over the wall time).
        steal: cores the hypervisor gave to other guests, on average.
        cores: the cores this process may run on; ``threads``: the run's intra-op threads.
        taken: the share of the cores the threads need that the others and steal took: (others + steal + threads -
            cores) / threads, at least 0 (one busy core of two, with two threads: 0.5).
    """

    others: float
    steal: float
    cores: int
    threads: int
    taken: float

    def text(self) -> str:
        """The figures in a few words."""
        return (f"other processes kept {self.others:.2f} of the {self.cores} cores busy and the hypervisor took "
                f"{self.steal:.2f} (on average), {100 * self.taken:.0f}% of what {self.threads} threads need")

    def to_dict(self) -> dict[str, Any]:
        """The figures, rounded, as plain JSON (what a board sends back)."""
        return {"others": round(self.others, 3), "steal": round(self.steal, 3), "cores": self.cores,
                "threads": self.threads, "taken": round(self.taken, 3)}


def cpu_use(start: CpuCounters | None, end: CpuCounters | None, threads: int | None) -> CpuUse | None:
    """What other processes (``others``) and the hypervisor (``steal``) took of the cores between ``start`` and
    ``end``, for a run of ``threads`` intra-op threads (default: every core); None without both counters."""
    if start is None or end is None or end.wall <= start.wall:
        return None
    wall = end.wall - start.wall
    others = max(0.0, (end.busy - start.busy) - (end.own - start.own)) / wall
    steal = max(0.0, end.steal - start.steal) / wall
    need = min(threads or end.cores, end.cores)
    return CpuUse(others, steal, end.cores, need, max(0.0, others + steal + need - end.cores) / need)
