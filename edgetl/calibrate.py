"""``edgetl device calibrate``: fit a device profile to the machine edgetl runs on.

1. Read the CPU (model, cores, ISA flags, clock) and RAM from the operating system, and derive the
   dense fp32 peak: ``threads x GHz x SIMD lanes x 2 (FMA) x 2 (FMA units)``.
2. Measure memory bandwidth with a large array copy (best of several).
3. Time a set of calibration architectures with ONNX Runtime (interleaved, minimum of many runs).
4. Fit the per-op-class efficiencies, the bandwidth efficiency and the per-kernel overhead with
   :func:`edgetl.predict.fit_roofline`.
5. Write a profile that passes the same strict schema, with the measurements in ``reference``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetl.cost import trace_model
from edgetl.errors import ConfigError
from edgetl.measure import Measurement, cpu_model, measure_models
from edgetl.predict import fit_roofline
from edgetl.profiles import DeviceProfile, save_profile, user_profile_dir

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


@dataclass
class CpuInfo:
    """What the operating system says about the CPU."""

    model: str
    cores: int
    ghz: float
    isa: list[str]
    ram_mb: float

    @property
    def simd_lanes_fp32(self) -> int:
        if "avx512f" in self.isa:
            return 16
        if "avx2" in self.isa or "avx" in self.isa:
            return 8
        return 4  # SSE or NEON: 128-bit vectors

    @property
    def has_vnni(self) -> bool:
        return any(f in self.isa for f in ("avx512_vnni", "avx_vnni", "avx512vnni"))


_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "neon", "asimd", "asimddp", "f16c")


def read_cpu() -> CpuInfo:
    """Read the CPU model, core count, clock, ISA flags and RAM of this machine."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    flags: set[str] = set()
    mhz: list[float] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "cpu MHz":
            mhz.append(float(value))
    ghz = max(mhz) / 1000 if mhz else 2.0
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.exists():
        ghz = int(max_freq.read_text()) / 1e6
    ram_mb = 0.0
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram_mb = int(m.group(1)) / 1024 if m else 0.0
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    isa = [f for f in _ISA_FLAGS if f in flags]
    return CpuInfo(cpu_model(), cores, round(ghz, 3), isa, round(ram_mb))


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measure memory bandwidth in GB/s: the best of ``repeats`` copies of a large array (read + write)."""
    import numpy as np

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
    import numpy as np

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


def _runtime_overhead_mb() -> float:
    """RSS growth of creating and running a tiny ONNX Runtime session (the runtime's own memory)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = rss_mb()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"input": np.ones((1, 8), np.float32)})
    return max(1.0, rss_mb() - before)


@dataclass
class CalibrationResult:
    """The fitted profile, where it was saved, and how well the fit matches the measurements."""

    profile: DeviceProfile
    path: Path
    measurements: dict[str, Measurement]
    ratios: dict[str, float]
    seconds: float


def calibrate(
    name: str = "local",
    out: str | os.PathLike[str] | None = None,
    models: Sequence[str] = CALIBRATION_MODELS,
    threads: int | None = None,
    rounds: int = 25,
    resolution: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    measurements: dict[str, Measurement] | None = None,
) -> CalibrationResult:
    """Measure this machine and write a device profile fitted to it.

    Args:
        name: the profile's name (a lowercase slug); it is then usable as ``--device NAME``.
        out: the YAML file to write; default ``<user profile dir>/<name>.yaml``, where ``--device``
            finds it.
        models: the calibration architectures.
        threads: ONNX Runtime threads (default: every core available to this process).
        rounds: timed runs per model.
        resolution: time every model at this input size (default: each model's own, as select predicts).
        progress: called as ``progress(done, total, step)``.
        measurements: timings of ``models`` made on this machine already (by
            :func:`edgetl.measure.measure_models` with the same ``threads``); they are fitted instead of
            timing the models again, e.g. to fit on timings interleaved with other models.

    Returns:
        A :class:`CalibrationResult`.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(f"profile name '{name}' must be a lowercase slug such as 'my-box'")
    if len(models) < 4:
        raise ConfigError("calibration needs at least 4 models to fit the roofline")
    start = time.monotonic()
    cpu = read_cpu()
    threads = threads or cpu.cores
    if progress:
        progress(0, len(models) + 2, "memory bandwidth")
    bandwidth = measure_bandwidth()
    overhead_mb = _runtime_overhead_mb()
    if measurements is None:
        measurements = measure_models(
            models, resolution=resolution, threads=threads, rounds=rounds,
            progress=(lambda d, t, m: progress(d + 1, t + 2, m)) if progress else None,
        )
    else:
        missing = [m for m in models if m not in measurements]
        if missing:
            raise ConfigError(f"no measurement given for {', '.join(missing)}")
        measurements = {m: measurements[m] for m in models}
    # The nominal peak uses the base clock; under turbo, BLAS and ONNX Runtime exceed it, and
    # efficiencies (fractions of peak) would be clipped at 1. The measured SGEMM rate bounds it below.
    nominal = threads * cpu.ghz * cpu.simd_lanes_fp32 * 2 * 2
    gemm = measure_gemm_gflops() * threads / max(cpu.cores, 1)
    peak_fp32 = max(nominal, gemm)
    peak_note = (f"{threads} threads x {cpu.ghz} GHz x {cpu.simd_lanes_fp32} fp32 lanes x 2 (FMA) x 2 FMA units"
                 if peak_fp32 == nominal else
                 f"measured: best 2048x2048 SGEMM in NumPy, {gemm:.0f} GFLOP/s for {threads} threads (above the "
                 f"nominal {nominal:.0f} at {cpu.ghz} GHz base clock)")
    samples = [(trace_model(m, meas.resolution), 1, meas.min_ms) for m, meas in measurements.items()]
    fit = fit_roofline(samples, peak_fp32 * 1e9, bandwidth * 1e9, "fp32")
    ratios = {m: r for m, r in zip(measurements, fit.ratios, strict=True)}
    if progress:
        progress(len(models) + 2, len(models) + 2, "done")

    int8_factor = 4 if cpu.has_vnni else 2
    int8_path = "VNNI" if cpu.has_vnni else "no VNNI: u8s8 through vpmaddubsw"
    host = platform.node() or "this machine"
    today = _dt.date.today().isoformat()
    import onnxruntime

    data = {
        "name": name,
        "version": 1,
        "family": "custom",
        "aliases": [],
        "description": f"{cpu.model}, {threads} threads, ONNX Runtime CPU; measured by edgetl device calibrate",
        "sources": {"measured": f"edgetl device calibrate on {host}, {today}, onnxruntime {onnxruntime.__version__}"},
        "runtime": "onnxruntime",
        "precisions": ["fp32", "int8"],
        "compute": {
            "fp32": {"value": round(peak_fp32, 1), "derived": peak_note},
            "int8": {"value": round(peak_fp32 * int8_factor, 1),
                     "derived": f"fp32 peak x {int8_factor} ({int8_path}); not measured"},
        },
        "memory": {
            "ram_mb": {"value": cpu.ram_mb, "derived": "MemTotal in /proc/meminfo"},
            "bandwidth_gbs": {"value": round(bandwidth, 2),
                              "derived": "measured: best of 5 copies of a 256 MB array (read + write)"},
            "model_budget_mb": {"value": round(cpu.ram_mb * 0.5), "derived": "ram_mb x 0.5"},
            "runtime_overhead_mb": {"value": round(overhead_mb, 1),
                                    "derived": "measured: RSS growth of creating and running an ONNX Runtime session"},
        },
        "efficiency": {
            "derived": (
                f"fitted by edgetl device calibrate to {len(samples)} models timed with ONNX Runtime fp32 "
                f"(minimum of {rounds} interleaved runs); {100 * fit.within(0.2):.0f}% of them within ±20% after "
                "the fit; classes no calibration model exercises keep the fitted bound"
            ),
            **{k: round(min(1.0, max(v, 1e-4)), 5) for k, v in fit.efficiency.items()},
            "bandwidth": round(min(1.0, fit.bandwidth_efficiency), 4),
        },
        "kernel_overhead_us": {"value": round(fit.kernel_overhead_us, 3),
                               "derived": "fitted by edgetl device calibrate"},
        "cpu": {"cores": cpu.cores, "threads": cpu.cores, "isa": cpu.isa, "model": cpu.model, "ghz": cpu.ghz,
                "derived": "read from /proc/cpuinfo and cpufreq"},
        "calibrated": {"host": host, "cpu": cpu.model, "date": today, "runtime": "onnxruntime",
                       "runtime_version": onnxruntime.__version__, "threads": threads},
        "reference": [
            {"model": m.model, "precision": "fp32", "batch": m.batch, "resolution": m.resolution,
             "latency_ms": round(m.min_ms, 4), "runtime": "onnxruntime", "metric": "min", "source": "measured"}
            for m in measurements.values()
        ],
    }
    profile = DeviceProfile.model_validate(data)
    path = Path(out) if out else user_profile_dir() / f"{name}.yaml"
    saved = save_profile(profile, path)
    return CalibrationResult(profile, saved, measurements, ratios, time.monotonic() - start)


def is_this_machine(profile: DeviceProfile) -> bool:
    """Whether ``profile`` was calibrated on this machine (same host and CPU model)."""
    cal = profile.calibrated
    if not cal:
        return False
    get = cal.get if isinstance(cal, dict) else lambda k, d=None: getattr(cal, k, d)
    return get("host") == (platform.node() or "this machine") and get("cpu") == cpu_model()
