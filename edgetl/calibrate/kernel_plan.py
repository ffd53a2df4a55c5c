"""The kernel step of ``edgetl device calibrate``, defined once for this machine and for a board over SSH: the
windows to time and their ONNX files (:func:`kernel_plan`), and the kernel model fitted to what they measured
(:func:`fit_kernels`).

The windows, each between two probes of the noise guard's reference kernel: chains of convolutions timed with and
without the profiler (what it adds to a kernel), every calibration model under the profiler and plainly, in
:data:`WHOLE_PASSES` passes spread through the step (the fastest profiled pass gives its kernels:
:func:`profiled_runs`; the fastest plain one anchors the run trend: :func:`whole_runs`),
``count`` micro-graphs of the catalog's distinct convolutions and matrix products, a matrix-vector product that
streams its weights from DRAM, and a one-ReLU model (what a run costs beyond its kernels); before them, unguarded,
a convolution whose shapes tell the runtime's channel block. They are run by
:func:`edgetl.calibrate.profiler.run_windows`, here (:func:`measure_kernels`) or on a board
(:func:`edgetl.board.calibrate.measure_board`), which needs no ``onnx`` package: every file is built here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import theilslopes

from edgetl.calibrate.kernel_timing import (
    CACHED_SPEEDUP,
    CHAIN_LENGTHS,
    PROFILER_CHAINS,
    cache_probes_mb,
    channel_block,
    channel_block_model,
    distinct_kernels,
    dram_probe_mb,
    micro_graph,
    profiler_chain,
    profiler_excess_us,
    reference_model,
    run_overhead_model,
    spread_sample,
    stream_gbs,
    stream_model,
    usable_cache_mb,
)
from edgetl.calibrate.measure import architecture_onnx
from edgetl.calibrate.noise import LEVEL_SPAN, NoiseSummary, speed_factors
from edgetl.calibrate.profiler import ProfiledRun, run_windows
from edgetl.device.kernel_model import KernelModel, fit_kernel_model
from edgetl.zoo.catalog import get_card, list_models
from edgetl.zoo.cost import CostTrace, OpCost, TraceError
from edgetl.zoo.model_cost import trace_model

log = logging.getLogger(__name__)

#: How many times the kernel step profiles each calibration model and times it whole: first, then in passes spread
#: through the micro-graphs and after them, a minute or more apart. The fastest whole run anchors the run trend
#: (:func:`whole_runs`), the fastest profiled run gives the model's kernels (:func:`profiled_runs`), and how far the
#: whole runs' median sits above their fastest says how noisy the run was (:func:`pass_spread`).
WHOLE_PASSES = 4


@dataclass
class KernelPlan:
    """The windows of a calibration's kernel step and how to build their files.

    Attributes:
        models: the calibration models profiled in place (windows :func:`profile_label`).
        micro: the labels of the micro-graph windows.
        sources: how many catalog models the micro-graphs were sampled from.
        cache_mb: the timed machine's last-level cache (MB), which sizes the streaming probe.
        windows: label -> window (see :func:`edgetl.calibrate.profiler.run_window`), in the order they run.
        before: the windows run before the guard starts (read from shapes, not times).
        builders: file key -> a function that builds the file (ONNX bytes, or the path of a file already built).
    """

    models: list[str]
    micro: list[str]
    sources: int
    cache_mb: float
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    builders: dict[str, Callable[[], bytes | Path]] = field(default_factory=dict)

    def job(self) -> dict[str, Any]:
        """The plan as :func:`~edgetl.calibrate.profiler.run_windows` takes it (plain JSON)."""
        return {"reference": "reference", "before": self.before, "windows": self.windows}

    def load(self, key: str) -> bytes | str:
        """The file ``key`` as ONNX Runtime loads it: its bytes, or its path."""
        built = self.builders[key]()
        return built if isinstance(built, bytes) else str(built)

    def write(self, folder: Path) -> dict[str, Path]:
        """Every file of the plan, as a file (those built as bytes are written into ``folder``): key -> path."""
        files = {}
        for key, build in self.builders.items():
            built = build()
            if isinstance(built, bytes):
                path = folder / f"{key}.onnx"
                path.write_bytes(built)
                built = path
            files[key] = Path(built)
        return files


def kernel_traces(sources: Sequence[str] | None, resolution: int | None) -> list[CostTrace]:
    """The cost traces of ``sources`` (default: every catalog architecture); those that cannot be traced are
    skipped."""
    names = list(sources) if sources is not None else [c.name for c in list_models(default_only=True)]
    traces = []
    for name in names:
        try:
            traces.append(trace_model(name, resolution))
        except TraceError as exc:
            log.debug("kernel sources: %s", exc)
    return traces


def _micro_bytes(op: OpCost) -> bytes:
    return micro_graph(op)[0]


def kernel_plan(models: Sequence[str], resolution: int | None, sources: Sequence[str] | None, count: int,
                cache_mb: float) -> KernelPlan:
    """The windows that time the kernels of ``models`` in place (at ``resolution``, default each model's own),
    ``count`` micro-graphs of the distinct kernels of ``sources`` (default: every catalog architecture), and what
    the kernel model needs besides, on a machine whose last-level cache is ``cache_mb``."""
    traces = kernel_traces(sources, resolution)
    ops = spread_sample(distinct_kernels(traces), count)
    plan = KernelPlan(list(models), [f"micro-graph {i}" for i in range(len(ops))], len(traces), cache_mb)
    plan.builders.update(reference=reference_model, block=channel_block_model, run=run_overhead_model,
                         stream=partial(stream_model, dram_probe_mb(cache_mb)))
    plan.before["block"] = {"kind": "profile", "model": "block", "warmup": 0, "runs": 1}
    for chain in PROFILER_CHAINS:
        long, short = (f"chain-{'-'.join(map(str, chain))}-{n}" for n in CHAIN_LENGTHS)
        plan.builders[long] = partial(profiler_chain, chain, CHAIN_LENGTHS[0])
        plan.builders[short] = partial(profiler_chain, chain, CHAIN_LENGTHS[1])
        plan.windows[f"profiler chain {chain}"] = {"kind": "chains", "model": long, "short": short}
    passes: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for i, name in enumerate(models):
        res = int(resolution or get_card(name).resolution)
        plan.builders[f"model-{i}"] = partial(architecture_onnx, name, res)
        window = {"model": f"model-{i}", "shape": [1, 3, res, res]}
        passes[name] = ({"kind": "profile", **window, "warmup": 5, "runs": 10},
                        {"kind": "plain", **window, "warmup": 3, "runs": 20})
    where = [-1, *(len(ops) * n // (WHOLE_PASSES - 1) for n in range(1, WHOLE_PASSES))]
    _model_passes(plan, passes, where, -1)
    for i, (label, op) in enumerate(zip(plan.micro, ops, strict=True)):
        _model_passes(plan, passes, where, i)
        plan.builders[f"micro-{i}"] = partial(_micro_bytes, op)
        plan.windows[label] = {"kind": "profile", "model": f"micro-{i}", "warmup": 3, "runs": 8}
    _model_passes(plan, passes, where, len(ops))
    plan.windows["stream"] = {"kind": "profile", "model": "stream", "warmup": 2, "runs": 5}
    for mb in cache_probes_mb(cache_mb):
        plan.builders[f"stream-{mb:g}"] = partial(stream_model, mb)
        plan.windows[f"cache probe {mb:g}"] = {"kind": "profile", "model": f"stream-{mb:g}", "warmup": 2, "runs": 5}
    plan.windows["run"] = {"kind": "plain", "model": "run", "warmup": 20, "runs": 200}
    return plan


def whole_label(name: str, n: int) -> str:
    """The label of the ``n``-th (from 0) window that times calibration model ``name`` whole."""
    return f"whole {name}" if n == 0 else f"whole {name} ({n + 1})"


def profile_label(name: str, n: int) -> str:
    """The label of the ``n``-th (from 0) window that profiles calibration model ``name``."""
    return f"model {name}" if n == 0 else f"model {name} ({n + 1})"


def _model_passes(plan: KernelPlan, passes: dict[str, tuple[dict[str, Any], dict[str, Any]]], where: list[int],
                  at: int) -> None:
    """Add to ``plan`` the passes over the calibration models (``passes``: name -> its profiled and its whole
    window) that run before micro-graph ``at`` (pass ``n`` runs before micro-graph ``where[n]``; -1: before them
    all, as the first does)."""
    for n, before in enumerate(where):
        if before == at:
            for name, (profiled, whole) in passes.items():
                plan.windows[profile_label(name, n)] = profiled
                plan.windows[whole_label(name, n)] = whole


def at_quiet(kind: str, result: Any, factor: float) -> Any:
    """What a window of ``kind`` measured (:func:`~edgetl.calibrate.profiler.run_window`), every time in it
    multiplied by ``factor`` (:func:`~edgetl.calibrate.noise.speed_factors`)."""
    def kernels(rows: list[list[Any]]) -> list[list[Any]]:
        return [[*row[:4], row[4] * factor] for row in rows]

    if kind == "profile":
        return kernels(result)
    if kind == "plain":
        return result * factor
    return {**result, "long_us": result["long_us"] * factor, "short_us": result["short_us"] * factor,
            "kernels": kernels(result["kernels"])}


def fit_kernels(plan: KernelPlan, measured: dict[str, Any], threads: int,
                by: str = "edgetl device calibrate") -> tuple[dict[str, Any], NoiseSummary]:
    """The profile's ``kernels`` entry fitted to what ``plan``'s windows measured
    (:func:`~edgetl.calibrate.profiler.run_windows`, here or on a board) and scaled to whole runs
    (:func:`with_run_scale`, to the calibration models' whole runs in the kernel step: :func:`whole_runs`), and the
    noise guard's figures (logged as a warning when the machine was too noisy). ``by``: what measured them, for the
    ``derived`` text."""
    factors = speed_factors(measured["guard"])
    done = {label: at_quiet(plan.windows[label]["kind"], result, factors.get(label, 1.0))
            for label, result in measured["windows"].items()}
    block = channel_block(ProfiledRun(measured["before"]["block"]))
    profiler_us = max(0.0, float(np.median([profiler_excess_us(done[f"profiler chain {c}"]) for c in PROFILER_CHAINS])))
    samples = [s for rows in profiled_runs(plan, done).values() for s in ProfiledRun(rows).samples(profiler_us, block)]
    n_in_place = len(samples)
    samples += [s for label in plan.micro for s in ProfiledRun(done[label]).samples(profiler_us, block)]
    dram_gbs, cache_mb, cache_text = _streaming(plan, done)
    model = fit_kernel_model(samples, threads, dram_gbs, cache_mb, block, float(done["run"]))
    noise = replace(NoiseSummary.of(measured["guard"]), passes=pass_spread(plan, measured["windows"]))
    if noise.noisy:
        log.warning(noise.warning())
    return with_run_scale({**model.to_dict(), "profiler_us": round(profiler_us, 2), "derived": (
        f"measured by {by} with ONNX Runtime's profiler, {threads} threads: the {n_in_place} kernels of the "
        f"{len(plan.models)} calibration models in place (the fastest of {WHOLE_PASSES} profiled passes) and "
        f"{len(samples) - n_in_place} kernels of {len(plan.micro)} micro-graphs of the distinct convolutions "
        f"and matrix products of {plan.sources} catalog models, each as it ran in the fastest of its runs after "
        f"warm-up, less the profiler's own {profiler_us:.1f} us per kernel (measured with chains of "
        f"convolutions timed with and without it); one sample per distinct kernel (median); weights stream from "
        f"DRAM at {model.stream_gbs:.1f} GB/s (a matrix-vector product of 4x the {plan.cache_mb:.0f} MB "
        f"last-level cache), {cache_text}; blocked convolutions pad channels to multiples of {block} (read from "
        f"the shapes the profiler reports); a run costs {model.run_us:.0f} us beyond its kernels (a one-ReLU "
        f"model); every window's times scaled to the machine at its quiet level by the reference's quiet level "
        f"over its level after the window (the median of {LEVEL_SPAN} probes; median factor "
        f"{np.median(list(factors.values()) or [1.0]):.3f}); noise: {noise.text()}")},
        whole_runs(plan, measured["windows"])), noise


def profiled_runs(plan: KernelPlan, windows: Mapping[str, Any]) -> dict[str, list[list[Any]]]:
    """Each calibration model's kernels as the kernel model takes them: those of the profiled pass whose kernels sum
    to the least (``windows``: label -> what the window measured, scaled to the quiet machine).

    Profiled once, a model's kernels moved with the host: in one of two calibrations in a row on a shared 2-core
    EPYC, densenet169's summed to 63.2 ms against 38.9 ms (another tenant had taken a core while it ran, unseen by
    the reference), and every model that shares them was predicted 1.3x slower."""
    return {name: min((windows[profile_label(name, n)] for n in range(WHOLE_PASSES)),
                      key=lambda rows: sum(row[4] for row in rows)) for name in plan.models}


def _passes(plan: KernelPlan, windows: Mapping[str, Any], name: str) -> list[float]:
    return [float(windows[whole_label(name, n)]) for n in range(WHOLE_PASSES)]


def pass_spread(plan: KernelPlan, windows: Mapping[str, Any]) -> float:
    """How far the calibration models' whole runs sat above their fastest pass (``windows``: label -> µs): the median
    over the models of their median pass over their fastest, less 1 (the profile records it:
    :attr:`~edgetl.calibrate.noise.NoiseSummary.passes`).

    On a shared 2-core EPYC the passes were bimodal: another tenant took a core for a while, and every run of a
    pass came out 1.5-1.7x slower, where the reference kernel did not always see it; the passes themselves do."""
    return float(np.median([np.median(t) / min(t) - 1 for t in (_passes(plan, windows, m) for m in plan.models)]))


def whole_runs(plan: KernelPlan, windows: Mapping[str, Any]) -> dict[str, tuple[float, int]]:
    """Each calibration model's whole run as the run trend takes it (:func:`with_run_scale`; ms, and its
    resolution): the fastest of its :data:`WHOLE_PASSES` timings in the kernel step (``windows``: label -> µs), as
    each timing is the fastest of its runs and each kernel the fastest of its.

    Any one timing of a whole run moved by 4-6% between two calibrations minutes apart on a shared host, and it
    moves every prediction. The slow ones are a mode, not a spread: another tenant takes a core for a while, and
    every run of a pass comes out 1.5-1.7x slower. A pass cannot run faster than the machine, so the fastest pass
    is the machine's; a median lands in the slow mode when half the passes do. In six pairs of calibrations in a row
    on a shared 2-core EPYC (every anchor fitted again from the same windows), the fastest pass put 61.9% of the
    catalog within ±5% on average (49.5% in the worst pair), the median 53.2% (18.9%); on a busy Xeon, over nine
    pairs, the fastest of all the timings 77.8% (54.6%), the median of the kernel step's 75.8% (4.1%)."""
    return {name: (min(_passes(plan, windows, name)) / 1e3, int(plan.windows[whole_label(name, 0)]["shape"][-1]))
            for name in plan.models}


def _streaming(plan: KernelPlan, done: dict[str, Any]) -> tuple[float, float, str]:
    """The DRAM streaming rate (GB/s), the cache a model's weights may use (MB), and how that was found."""
    dram_gbs = stream_gbs(ProfiledRun(done["stream"]), dram_probe_mb(plan.cache_mb))
    rates = {mb: stream_gbs(ProfiledRun(done[f"cache probe {mb:g}"]), mb) for mb in cache_probes_mb(plan.cache_mb)}
    cache_mb = usable_cache_mb(rates, dram_gbs, plan.cache_mb)
    probes = ", ".join(f"{mb:g} MB at {gbs:.1f} GB/s" for mb, gbs in rates.items())
    return dram_gbs, cache_mb, (f"and weights are read from the cache up to {cache_mb:g} MB (smaller matrix-vector "
                                f"products, {CACHED_SPEEDUP:g}x faster than DRAM counts as cached: {probes})")


def with_run_scale(kernels: dict[str, Any], whole: Mapping[str, tuple[float, int]]) -> dict[str, Any]:
    """``kernels`` (a profile's entry) with the trend of a whole run's fastest time over the sum of its kernels'
    predicted times in the mean kernel time (``run_scale``, ``run_slope``, ``run_kernel_us``), fitted (Theil-Sen:
    one noisy timing does not move it) to the calibration models' whole runs (``whole``: name -> ms and
    resolution; :func:`whole_runs` gives them).

    It anchors the kernel sums to whole runs: what the profiler's kernels leave out, and the speed of the machine as
    whole runs find it. The ratio follows the mean kernel time: on a 2-core Xeon it was about 0.8 for models of
    15-60 us kernels and 1.0-1.15 for those of 200-3,300 us, and one median ratio was up to 20% off at either end."""
    if not whole:
        return kernels
    model = KernelModel.from_dict({**kernels, "run_scale": 1.0, "run_slope": 0.0})
    means, ratios = [], []
    for name, (ms, resolution) in whole.items():
        by_kind, count = model.kernel_sums(trace_model(name, resolution))
        means.append(sum(by_kind.values()) * 1e3 / max(1, count))
        ratios.append(ms / (sum(by_kind.values()) + model.run_us / 1e3))
    lo, hi = min(means), max(means)
    slope, intercept = theilslopes(ratios, np.log(means))[:2] if len(ratios) >= 3 and hi > lo else (0.0, 0.0)
    scale = float(intercept + slope * np.log(lo * hi) / 2) if slope else float(np.median(ratios))
    return {**kernels, "run_scale": round(scale, 4), "run_slope": round(float(slope), 4),
            "run_kernel_us": [round(lo, 1), round(hi, 1)], "derived": (
        f"{kernels['derived']}; a prediction is the sum of its kernels times {scale:.3f} at a mean kernel time of "
        f"{np.sqrt(lo * hi):.0f} us, {slope:+.3f} per e-fold of it between {lo:.0f} and {hi:.0f} us: the trend over "
        f"the {len(ratios)} calibration models of their whole run (the fastest of the kernel step's timings) over "
        f"the sum of their kernels ({min(ratios):.2f}-{max(ratios):.2f})")}


def measure_kernels(models: Sequence[str], resolution: int | None, sources: Sequence[str] | None, count: int,
                    threads: int, cache_mb: float) -> tuple[dict[str, Any], NoiseSummary]:
    """Run :func:`kernel_plan`'s windows for the calibration ``models`` on this machine and fit them
    (:func:`fit_kernels`)."""
    plan = kernel_plan(models, resolution, sources, count, cache_mb)
    return fit_kernels(plan, run_windows(plan.job(), plan.load, threads), threads)
