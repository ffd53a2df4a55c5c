"""``edgetl device calibrate``: fit a device profile to the machine edgetl runs on.

1. Read the CPU (model, cores, ISA flags, clock) and RAM from the operating system, and derive the
   dense fp32 peak: ``threads x GHz x SIMD lanes x 2 (FMA) x 2 (FMA units)``.
2. Measure memory bandwidth with a large array copy (best of several).
3. Time a set of calibration architectures with ONNX Runtime, each in its steady state (alone, warmed up,
   consecutive runs, in three passes; :func:`edgetl.calibrate.measure.measure_models`), and keep the
   minimum of many runs. Not interleaved: the fit predicts a deployed model, which runs alone, again and again.
4. Fit the per-op-class efficiencies, the bandwidth efficiency and the per-kernel overhead with
   :func:`edgetl.device.latency.fit_roofline`.
5. Time ResNet-18 at FP32 and as static INT8 (QDQ) side by side and keep the ratio: the INT8 speed-up of
   this machine, measured rather than inferred from its ISA.
6. Time the kernels one by one (:mod:`edgetl.calibrate.kernel_plan`, the same windows here and on a board over
   SSH): every kernel of the calibration models
   under ONNX Runtime's profiler, in place, and micro-graphs of a sample of the distinct convolutions and matrix
   products of the catalog's models; with what the profiler adds to a kernel, the rate at which weights stream from
   DRAM and the last-level cache. They predict this machine's latency kernel by kernel
   (:mod:`edgetl.device.kernel_model`). A reference kernel timed between them
   (:class:`edgetl.calibrate.noise.NoiseGuard`) finds what was timed under load from another process: timed again,
   scaled to the machine's quiet level, recorded in the profile, and warned about when the machine was too noisy.
7. Measure the peak RSS of a few models' sessions (each in a fresh process: load + 3 inferences) and fit
   ``conv weights x factor + other weights x factor + activations x factor + constant`` to them
   (:func:`edgetl.device.latency.fit_memory`).
8. Write a profile that passes the same strict schema, with the measurements in ``reference``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.calibrate.kernel_plan import KernelPlan, fit_kernels, measure_kernels
from edgetl.calibrate.measure import Measurement, architecture_onnx, measure_memory, measure_models
from edgetl.calibrate.noise import NoiseSummary
from edgetl.device.latency import MemoryFit, RooflineFit, fit_memory, fit_roofline, int8_speedup_for_isa
from edgetl.device.machine import CpuInfo, fingerprint, host_name, last_level_cache_mb, read_cpu, runtime_version
from edgetl.device.profiles import DeviceProfile, load_profile, profile_path, save_profile, user_profile_dir
from edgetl.errors import ConfigError
from edgetl.options import KERNEL_SAMPLES
from edgetl.runtime.bench import (
    benchmark_interleaved,
    measure_bandwidth,
    measure_gemm_gflops,
    random_input,
    session_growth_mb,
)
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import tensorrt_available
from edgetl.zoo.catalog import get_card
from edgetl.zoo.model_cost import trace_model
from edgetl.zoo.quantize import quantize_int8_static

log = logging.getLogger(__name__)

#: Architectures timed by ``calibrate``: together they exercise every op class (dense, grouped and
#: depthwise convolutions, squeeze-excitation, channel shuffles, attention, LayerNorm).
CALIBRATION_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_x_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "convnext_tiny",
    "vit_b_32",
    # large dense convs and FC layers, concatenations, inception branches, deep stacks: with only the
    # ten above, the fit left these shapes to chance and the held-out error doubled
    "vgg13",
    "densenet169",
    "inception_v3",
    "regnet_y_1_6gf",
    "mnasnet0_75",
    "efficientnet_b3",
    "resnet152",
    "shufflenet_v2_x1_5",
)

#: Architectures whose session peak RSS ``calibrate`` measures to fit the memory model: from 1 to 133 M
#: parameters, with small and large live activations (depthwise nets, dense concatenations).
MEMORY_MODELS: tuple[str, ...] = (
    "squeezenet1_1", "mobilenet_v3_small", "mobilenet_v2", "efficientnet_b0", "resnet18", "densenet169",
    "resnet50", "convnext_tiny", "vgg13",
)


def tiny_session_model() -> bytes:
    """A one-ReLU ONNX model: a session of it costs only the runtime's own memory."""
    from onnx import TensorProto, helper  # deferred: heavy

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _runtime_overhead_mb() -> float:
    """RSS growth of creating and running a tiny ONNX Runtime session (the runtime's own memory)."""
    return session_growth_mb(tiny_session_model())


@dataclass
class CalibrationResult:
    """The fitted profile, where it was saved, and how well the fit matches the measurements."""

    profile: DeviceProfile
    path: Path
    measurements: dict[str, Measurement]
    ratios: dict[str, float]
    seconds: float
    memory_mb: dict[str, float] = field(default_factory=dict)
    memory_ratios: dict[str, float] = field(default_factory=dict)
    noise: NoiseSummary | None = None


@dataclass
class _Machine:
    """What calibration measured about the machine itself, besides the model timings."""

    cpu: CpuInfo
    threads: int
    bandwidth_gbs: float
    overhead_mb: float
    peak_fp32: float = 0.0
    peak_note: str = ""
    memory_mb: dict[str, float] = field(default_factory=dict)
    memory_fit: MemoryFit | None = None
    int8_speedup: float | None = None
    int8_note: str = ""
    kernels: dict[str, Any] | None = None
    noise: NoiseSummary | None = None


@dataclass
class Readings:
    """What a remote-execution hook measured on another machine (``edgetl device calibrate --on``): used instead of
    measuring this one. The model timings and memory come as ``measurements`` and ``memory_mb``.

    Attributes:
        cpu: that machine's CPU, as :func:`edgetl.device.machine.read_cpu` read it there.
        bandwidth_gbs, gemm_gflops, overhead_mb: :func:`~edgetl.runtime.bench.measure_bandwidth`,
            :func:`~edgetl.runtime.bench.measure_gemm_gflops` and the runtime's own memory, measured there.
        host, runtime_version, fingerprint: that machine's name, ONNX Runtime version and fingerprint.
        int8_speedup, int8_note: its measured FP32 / INT8 ratio and how it was measured (None: not measured).
        kernels: the kernel step's windows (:func:`edgetl.calibrate.kernel_plan.kernel_plan`) and what they measured
            there (:func:`edgetl.calibrate.profiler.run_windows`); None: kernels not timed.
    """

    cpu: CpuInfo
    bandwidth_gbs: float
    gemm_gflops: float
    overhead_mb: float
    host: str
    runtime_version: str
    fingerprint: dict[str, Any]
    int8_speedup: float | None = None
    int8_note: str = ""
    kernels: tuple[KernelPlan, dict[str, Any]] | None = None


def calibrate(
    name: str = "local",
    out: str | os.PathLike[str] | None = None,
    models: Sequence[str] = CALIBRATION_MODELS,
    threads: int | None = None,
    rounds: int = 25,
    resolution: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    measurements: dict[str, Measurement] | None = None,
    runtime: str | None = None,
    memory_mb: dict[str, float] | None = None,
    int8: bool = True,
    kernel_models: Sequence[str] | None = None,
    kernel_samples: int = KERNEL_SAMPLES,
    readings: Readings | None = None,
) -> CalibrationResult:
    """Measure this machine and write a device profile fitted to it.

    Args:
        name: the profile's name (a lowercase slug); it is then usable as ``--device NAME``.
        out: the YAML file to write; default ``<user profile dir>/<name>.yaml``, where ``--device`` finds it.
        models: the calibration architectures.
        threads: ONNX Runtime threads (default: every core available to this process).
        rounds: timed runs per model.
        resolution: time every model at this input size (default: each model's own, as select predicts).
        progress: called as ``progress(done, total, step)``.
        measurements: timings of ``models`` made on this machine already (by
            :func:`edgetl.calibrate.measure.measure_models` with the same ``threads``); they are fitted instead of
            timing the models again (e.g. timed in the same session as held-out models).
        runtime: ``onnxruntime`` (the CPU) or ``tensorrt`` (FP16 engines on a Jetson's GPU; a ``runtime: tensorrt``
            profile); default: tensorrt on a Jetson where it is available, else onnxruntime.
        memory_mb: session peak RSS (MB) of models measured on this machine already (by
            :func:`edgetl.calibrate.measure.measure_memory`); fitted instead of measuring :data:`MEMORY_MODELS` again.
        int8: time :data:`INT8_MODEL` at FP32 and INT8 and store the speed-up (``False``: the ISA's).
        kernel_models: the models whose distinct convolutions and matrix products are sampled for micro-graphs
            (default: every architecture of the catalog, at its default weights).
        kernel_samples: how many micro-graphs to time (0: no kernel timings; the fitted roofline predicts).
        readings: the machine as measured elsewhere (a board over SSH), with ``measurements``, ``memory_mb`` and
            its kernel timings (``readings.kernels``, fitted here as local ones are): nothing is measured here.

    Returns:
        A :class:`CalibrationResult`.
    """
    _check_request(name, models, out)
    if (runtime or _default_runtime()) == "tensorrt":
        return _calibrate_tensorrt(name, out, models, rounds, resolution, progress)
    start = time.monotonic()
    cpu = readings.cpu if readings else read_cpu()
    threads = threads or cpu.cores
    if progress:
        progress(0, len(models) + 2, "memory bandwidth")
    machine = (_Machine(cpu, threads, readings.bandwidth_gbs, readings.overhead_mb) if readings
               else _Machine(cpu, threads, measure_bandwidth(), _runtime_overhead_mb()))
    measurements = _timings(models, measurements, resolution, threads, rounds, progress)
    machine.peak_fp32, machine.peak_note = _peak_fp32(cpu, threads, readings.gemm_gflops if readings else None)
    samples = [(trace_model(m, meas.resolution), 1, meas.min_ms) for m, meas in measurements.items()]
    fit = fit_roofline(samples, machine.peak_fp32 * 1e9, machine.bandwidth_gbs * 1e9, "fp32")
    ratios = {m: r for m, r in zip(measurements, fit.ratios, strict=True)}
    if progress:
        progress(len(models) + 1, len(models) + 2, "memory of a few sessions, INT8 against FP32")
    _fit_memory(machine, memory_mb, _memory_models(models), resolution)
    if readings:
        machine.int8_speedup, machine.int8_note = readings.int8_speedup, readings.int8_note
    elif int8:
        _measure_int8(machine, resolution, rounds)
    if progress and kernel_samples > 0 and not readings:
        progress(len(models) + 1, len(models) + 2, "kernels, one by one")
    _fit_kernels(machine, readings, measurements, resolution, kernel_models, kernel_samples)
    if progress:
        progress(len(models) + 2, len(models) + 2, "done")
    profile = DeviceProfile.model_validate(_profile_data(name, machine, fit, measurements, rounds, readings))
    saved = save_profile(profile, Path(out) if out else user_profile_dir() / f"{name}.yaml")
    memory_ratios = dict(zip(machine.memory_mb, machine.memory_fit.ratios, strict=True)) if machine.memory_fit else {}
    return CalibrationResult(profile, saved, measurements, ratios, time.monotonic() - start, machine.memory_mb,
                             memory_ratios, machine.noise)


def _fit_kernels(machine: _Machine, readings: Readings | None, measurements: dict[str, Measurement],
                 resolution: int | None, kernel_models: Sequence[str] | None, kernel_samples: int) -> None:
    """The kernel model, fitted to the board's kernel timings (``readings``) or to ``kernel_samples`` timed here,
    and scaled to the calibration models' whole runs as the kernel step timed them (``measurements``: their names)."""
    if readings and readings.kernels:
        machine.kernels, machine.noise = fit_kernels(*readings.kernels, machine.threads, "edgetl device calibrate --on")
    elif kernel_samples > 0 and not readings:
        machine.kernels, machine.noise = measure_kernels(list(measurements), resolution, kernel_models, kernel_samples,
                                                         machine.threads, last_level_cache_mb())


#: The model timed at FP32 and INT8 to measure the INT8 speed-up: dense convolutions, as ISA INT8 paths favour.
INT8_MODEL = "resnet18"


def _measure_int8(machine: _Machine, resolution: int | None, rounds: int) -> None:
    """Time :data:`INT8_MODEL` at FP32 and as static QDQ INT8 (calibrated on random inputs: latency does not
    depend on the values) and store FP32 / INT8 on ``machine``.

    The two are timed interleaved, in blocks of 3 after an untimed run: this *compares* two candidates, so
    load on a shared machine must hit both alike; only their ratio is kept, never either latency.
    """
    res = int(resolution or get_card(INT8_MODEL).resolution)
    fp32 = architecture_onnx(INT8_MODEL, res)
    shape = (1, 3, res, res)
    # x86 without VNNI: 7-bit weights, as export quantizes for it (ONNX Runtime's U8S8 AVX2 path saturates)
    reduce = (int8_speedup_for_isa(machine.cpu.isa) or (1.0, ""))[0] <= 1.0
    with tempfile.TemporaryDirectory(prefix="edgetl-int8-") as tmp:
        int8 = Path(tmp) / "int8.onnx"
        quantize_int8_static(fp32, int8, [random_input(shape, seed) for seed in range(4)], reduce_range=reduce)
        runners = {p: OnnxRuntimeRunner(path, providers="cpu", threads=machine.threads, name=p)
                   for p, path in (("fp32", fp32), ("int8", int8))}
        results = benchmark_interleaved(runners, shape, rounds=max(1, -(-rounds // 3)), iterations_per_round=3,
                                        warmup=5, settle=1, cv_threshold=10.0)
    machine.int8_speedup = results["fp32"].min / results["int8"].min
    machine.int8_note = (
        f"measured by edgetl device calibrate: {INT8_MODEL} at {res} px, FP32 {results['fp32'].min:.2f} ms / static "
        f"QDQ INT8 {results['int8'].min:.2f} ms (minimum of {results['int8'].iterations} runs each, interleaved"
        f"{', 7-bit weights' if reduce else ''}), {machine.threads} threads"
    )


def _memory_models(models: Sequence[str]) -> list[str]:
    """The models whose memory is measured: those of :data:`MEMORY_MODELS` among ``models``, else up to 6 of them."""
    chosen = [m for m in models if m in MEMORY_MODELS]
    return chosen if len(chosen) >= 4 else list(models[:6])


def _fit_memory(machine: _Machine, given: dict[str, float] | None, models: list[str],
                resolution: int | None) -> None:
    """Measure (or take from ``given``) the session peak RSS of ``models`` and fit the memory model to it."""
    if given is None:
        given = measure_memory(models, resolution=resolution, threads=machine.threads)
    if len(given) < 3:  # three terms to fit
        log.warning("memory model not fitted: %d measured models, 3 needed", len(given))
        return
    machine.memory_mb = dict(given)
    samples = [(trace_model(m, resolution or get_card(m).resolution), mb) for m, mb in given.items()]
    machine.memory_fit = fit_memory(samples, "fp32")


#: Built-in Jetson profiles by the words of ``/proc/device-tree/model``, most specific first.
JETSON_MODULES: tuple[tuple[str, str], ...] = (
    ("agx orin", "jetson-agx-orin-64gb"), ("orin nx", "jetson-orin-nx-16gb"), ("orin nano", "jetson-orin-nano"),
    ("agx xavier", "jetson-agx-xavier"), ("xavier nx", "jetson-xavier-nx"), ("nano", "jetson-nano"),
)
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def _device_tree_model() -> str:
    try:
        return _DEVICE_TREE_MODEL.read_text(errors="ignore").strip("\x00 \n").lower()
    except OSError:
        return ""


def _default_runtime() -> str:
    """TensorRT on a Jetson that has it, else ONNX Runtime."""
    return "tensorrt" if "jetson" in _device_tree_model() and tensorrt_available() else "onnxruntime"


def jetson_base_profile() -> DeviceProfile:
    """The built-in profile of this Jetson module (its GPU peaks and memory), from ``/proc/device-tree/model``."""
    text = _device_tree_model()
    for words, profile in JETSON_MODULES:
        if words in text:
            return load_profile(profile)
    raise ConfigError(f"a TensorRT profile needs a Jetson module edgetl knows, and this is "
                      f"'{text or 'not a Jetson'}'; calibrate ONNX Runtime instead (--runtime onnxruntime)")


def _calibrate_tensorrt(name: str, out: str | os.PathLike[str] | None, models: Sequence[str], rounds: int,
                        resolution: int | None,
                        progress: Callable[[int, int, str], None] | None) -> CalibrationResult:
    """Time FP16 engines of ``models`` on this Jetson and fit the module's built-in profile to them."""
    start = time.monotonic()
    base = jetson_base_profile()
    measurements = measure_models(models, resolution=resolution, rounds=rounds, runtime="tensorrt", progress=progress)
    samples = [(trace_model(m, meas.resolution), 1, meas.min_ms) for m, meas in measurements.items()]
    fit = fit_roofline(samples, base.peak_gflops("fp16") * 1e9, base.memory.bandwidth_gbs.value * 1e9, "fp16")
    profile = DeviceProfile.model_validate(_tensorrt_profile_data(name, base, fit, measurements, rounds))
    saved = save_profile(profile, Path(out) if out else user_profile_dir() / f"{name}.yaml")
    ratios = {m: r for m, r in zip(measurements, fit.ratios, strict=True)}
    return CalibrationResult(profile, saved, measurements, ratios, time.monotonic() - start)


def _tensorrt_profile_data(name: str, base: DeviceProfile, fit: RooflineFit, measurements: dict[str, Measurement],
                           rounds: int) -> dict[str, Any]:
    """The Jetson module's built-in figures, with the efficiencies fitted to the engines timed here."""
    cpu, version = read_cpu(), runtime_version("tensorrt")
    host, today = host_name(), _dt.date.today().isoformat()
    data = base.model_dump(mode="json", exclude_none=True)
    data.update(
        name=name, family="custom", aliases=[],
        description=f"{base.name} as measured by edgetl device calibrate: FP16 TensorRT {version} engines",
        sources={**data["sources"], "measured": f"edgetl device calibrate on {host}, {today}, TensorRT {version}"},
        efficiency=_efficiency(fit, measurements, rounds, "FP16 TensorRT engines"),
        kernel_overhead_us={"value": round(fit.kernel_overhead_us, 3), "derived": "fitted by edgetl device calibrate"},
        calibrated={"host": host, "cpu": cpu.model, "date": today, "runtime": "tensorrt", "runtime_version": version,
                    "fingerprint": fingerprint(cpu, "tensorrt")},
        reference=[{"model": m.model, "precision": "fp16", "batch": m.batch, "resolution": m.resolution,
                    "latency_ms": round(m.min_ms, 4), "runtime": "tensorrt", "metric": "min",
                    "used_for_fit": True, "source": "measured"}
                   for m in measurements.values()],
    )
    return data


def _check_request(name: str, models: Sequence[str], out: str | os.PathLike[str] | None) -> None:
    """What can be refused before minutes of measuring: the name, the models, the --out file name."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(f"profile name '{name}' must be a lowercase slug such as 'my-box'")
    if len(models) < 4:
        raise ConfigError("calibration needs at least 4 models to fit the roofline")
    if out is not None:
        profile_path(name, out)


def _timings(models: Sequence[str], given: dict[str, Measurement] | None, resolution: int | None, threads: int,
             rounds: int, progress: Callable[[int, int, str], None] | None) -> dict[str, Measurement]:
    """Time ``models`` here, or take their timings from ``given``."""
    if given is None:
        return measure_models(
            models, resolution=resolution, threads=threads, rounds=rounds,
            progress=(lambda d, t, m: progress(d + 1, t + 2, m)) if progress else None,
        )
    missing = [m for m in models if m not in given]
    if missing:
        raise ConfigError(f"no measurement given for {', '.join(missing)}")
    return {m: given[m] for m in models}


def _peak_fp32(cpu: CpuInfo, threads: int, gemm_gflops: float | None = None) -> tuple[float, str]:
    """The dense fp32 peak in GFLOP/s for ``threads`` threads, and how it was derived (``gemm_gflops``: the SGEMM
    rate on every core, measured elsewhere)."""
    # The nominal peak uses the base clock; under turbo, BLAS and ONNX Runtime exceed it, and
    # efficiencies (fractions of peak) would be clipped at 1. The measured SGEMM rate bounds it below.
    nominal = threads * cpu.ghz * cpu.simd_lanes_fp32 * 2 * 2
    gemm = (gemm_gflops or measure_gemm_gflops()) * threads / max(cpu.cores, 1)
    if nominal >= gemm:
        return nominal, f"{threads} threads x {cpu.ghz} GHz x {cpu.simd_lanes_fp32} fp32 lanes x 2 (FMA) x 2 FMA units"
    return gemm, (f"measured: best 2048x2048 SGEMM in NumPy, {gemm:.0f} GFLOP/s for {threads} threads (above the "
                  f"nominal {nominal:.0f} at {cpu.ghz} GHz base clock)")


def _profile_data(name: str, machine: _Machine, fit: RooflineFit, measurements: dict[str, Measurement],
                  rounds: int, readings: Readings | None = None) -> dict[str, Any]:
    """The profile's fields: the figures measured here (or as ``readings``), the fitted efficiencies and the
    reference timings."""
    import onnxruntime  # deferred: heavy

    cpu, threads = machine.cpu, machine.threads
    host, today = (readings.host if readings else host_name()), _dt.date.today().isoformat()
    ort_version = readings.runtime_version if readings else onnxruntime.__version__
    return {
        "name": name,
        "version": 1,
        "family": "custom",
        "aliases": [],
        "description": f"{cpu.model}, {threads} threads, ONNX Runtime CPU; measured by edgetl device calibrate",
        "sources": {"measured": f"edgetl device calibrate on {host}, {today}, onnxruntime {ort_version}"},
        "runtime": "onnxruntime",
        "precisions": ["fp32", "int8"],
        "compute": _compute(machine),
        "memory": _memory(machine),
        "efficiency": _efficiency(fit, measurements, rounds),
        "kernel_overhead_us": {"value": round(fit.kernel_overhead_us, 3),
                               "derived": "fitted by edgetl device calibrate"},
        **({"int8_speedup": {"value": round(machine.int8_speedup, 3), "derived": machine.int8_note}}
           if machine.int8_speedup is not None else {}),
        **({"kernels": machine.kernels} if machine.kernels is not None else {}),
        "cpu": {"cores": cpu.cores, "threads": cpu.cores, "isa": cpu.isa, "model": cpu.model, "ghz": cpu.ghz,
                "derived": "read from /proc/cpuinfo and cpufreq"},
        "calibrated": {"host": host, "cpu": cpu.model, "date": today, "runtime": "onnxruntime",
                       "runtime_version": ort_version, "threads": threads,
                       "fingerprint": readings.fingerprint if readings else fingerprint(cpu)},
        "reference": [
            {"model": m.model, "precision": "fp32", "batch": m.batch, "resolution": m.resolution,
             "latency_ms": round(m.min_ms, 4), "runtime": "onnxruntime", "metric": "min", "used_for_fit": True,
             "source": "measured"}
            for m in measurements.values()
        ],
    }


def _compute(machine: _Machine) -> dict[str, Any]:
    if machine.int8_speedup is not None:
        int8_factor = machine.int8_speedup
        int8_note = f"fp32 peak x the measured INT8 speed-up {machine.int8_speedup:.2f}"
    else:
        factor, path = int8_speedup_for_isa(machine.cpu.isa) or (1.0, "an ISA edgetl does not know")
        int8_factor, int8_note = factor, f"fp32 peak x {factor:g} ({path}); not measured"
    return {
        "fp32": {"value": round(machine.peak_fp32, 1), "derived": machine.peak_note},
        "int8": {"value": round(machine.peak_fp32 * int8_factor, 1), "derived": int8_note},
    }


def _memory(machine: _Machine) -> dict[str, Any]:
    ram_mb = machine.cpu.ram_mb
    return {
        "ram_mb": {"value": ram_mb, "derived": "MemTotal in /proc/meminfo"},
        "bandwidth_gbs": {"value": round(machine.bandwidth_gbs, 2),
                          "derived": "measured: best of 5 copies of a 256 MB array (read + write)"},
        "model_budget_mb": {"value": round(ram_mb * 0.5), "derived": "ram_mb x 0.5"},
        "runtime_overhead_mb": {"value": round(machine.overhead_mb, 1),
                                "derived": "measured: RSS growth of creating and running an ONNX Runtime session"},
        **_rss_fit(machine),
    }


def _rss_fit(machine: _Machine) -> dict[str, Any]:
    """The ``memory.rss_fit`` entry: the memory model fitted to the sessions measured here, and how."""
    fit = machine.memory_fit
    if fit is None:
        return {}
    return {"rss_fit": {
        "conv_weights_factor": round(fit.conv_weights_factor, 3),
        "weights_factor": round(fit.weights_factor, 3),
        "activations_factor": round(fit.activations_factor, 3),
        "constant_mb": round(fit.constant_mb, 1),
        "derived": (
            f"fitted by edgetl device calibrate (non-negative least squares, relative error) to the peak RSS of "
            f"ONNX Runtime fp32 sessions of {len(machine.memory_mb)} models ({', '.join(machine.memory_mb)}), "
            f"each in a fresh process: RSS before the session to the peak after loading it and 3 inferences at "
            f"batch 1; {100 * fit.within(0.25):.0f}% of them within ±25% after the fit; INT8 and FP16 take the same "
            "factors on their smaller weights"
        ),
    }}


def _efficiency(fit: RooflineFit, measurements: dict[str, Measurement], rounds: int,
                timed: str = "ONNX Runtime fp32") -> dict[str, Any]:
    cvs = [m.cv for m in measurements.values()]
    return {
        "derived": (
            f"fitted by edgetl device calibrate to {len(measurements)} models timed as {timed} "
            f"(each alone, warmed up, minimum of {rounds} consecutive runs; coefficient of variation of their runs "
            f"{float(np.median(cvs)):.3f} (median), at most {max(cvs):.3f}); "
            f"{100 * fit.within(0.2):.0f}% of them within ±20% after "
            "the fit; classes no calibration model exercises keep the fitted bound"
        ),
        **{k: round(min(1.0, max(v, 1e-4)), 5) for k, v in fit.efficiency.items()},
        "bandwidth": round(min(1.0, fit.bandwidth_efficiency), 4),
    }
