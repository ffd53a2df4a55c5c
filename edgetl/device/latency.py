"""Latency and memory prediction from a :class:`~edgetl.zoo.cost.CostTrace` and a device profile.

On a profile with kernel timings measured by ``edgetl device calibrate`` (``kernels``), latency is the sum over
the model's kernels of the device's own kernel timings (:mod:`edgetl.device.kernel_model`). Elsewhere it is a per-op
roofline. For every op that the runtime launches as its own kernel (ops fused
into a preceding conv/matmul are free, see :mod:`edgetl.zoo.cost`)::

    t_op = max(FLOPs * B / (peak[precision] * eff[class]),  bytes / (bandwidth * eff[bandwidth]))
           + kernel_overhead

    bytes = (weight_elements + (act_in + act_out) * B) * bytes_per_element[precision]

with ``B`` the batch size, ``peak`` the device's dense peak in GFLOP/s for the precision,
``eff[class]`` the fraction of peak the device reaches on that op class, and bytes per element
4 / 2 / 1 for fp32 / fp16 / int8. The model's latency is the sum over ops.

Memory is what the deployed model needs resident. With a profile fitted to measured peak RSS
(``memory.rss_fit``, written by ``edgetl device calibrate``)::

    memory = (conv_weights_factor * conv_weights + weights_factor * other_weights) * bytes_per_element
             + activations_factor * peak_live_activations * B * bytes_per_element + constant

(the runtime keeps several copies of the weights: the file read, the initializers, their pre-packed
layouts), else the plain sum with the profile's ``runtime_overhead_mb``::

    memory = params * bytes_per_element + peak_live_activations * B * bytes_per_element
             + runtime_overhead

The predictor's error against real measurements is published by ``tools/bench/predictor_accuracy.py``
and checked against the profiles' reference measurements in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.zoo.cost import OP_CLASSES, CostTrace

if TYPE_CHECKING:
    from edgetl.device.schema import DeviceProfile

BYTES_PER_ELEMENT: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}

#: INT8 compute peak over FP32 on a CPU, by the best INT8 instruction the ISA has (first match wins):
#: (ISA flags, factor, why). ``/proc/cpuinfo`` spellings; dashes and underscores do not matter.
CPU_INT8_SPEEDUP: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("amx_int8",), 8.0,
     "AMX-INT8 tiles: 16-32x the AVX-512 FP32 rate in theory; ONNX Runtime ran ResNet-18 INT8 9x faster than "
     "FP32 on a Xeon with AMX (DESIGN.md), 8x taken"),
    (("avx512_vnni", "avx_vnni", "avx512vnni"), 4.0,
     "VNNI: VPDPBUSD does 4 u8 x s8 multiply-accumulates per 32-bit lane where FP32 does 1 FMA"),
    (("asimddp", "dotprod"), 4.0,
     "Arm dot product (SDOT): 16 int8 multiply-accumulates per 128-bit op instead of 4 FP32 FMAs"),
    (("neon", "asimd"), 2.0,
     "Arm NEON without dot product: widening 16-bit multiply-accumulates, 8 lanes per 128-bit op instead of 4"),
    (("avx2", "avx", "sse4_2"), 1.0,
     "x86 without VNNI: ONNX Runtime's U8S8 AVX2 path brings no INT8 speed-up (and can saturate)"),
)


def _isa_key(flag: str) -> str:
    return re.sub(r"[^a-z0-9]", "", flag.lower())


def int8_speedup_for_isa(isa: Iterable[str]) -> tuple[float, str] | None:
    """How many times a CPU's INT8 peak exceeds its FP32 peak, and why; None for an ISA edgetl does not know."""
    have = {_isa_key(f) for f in isa}
    for flags, factor, why in CPU_INT8_SPEEDUP:
        if any(_isa_key(f) in have for f in flags):
            return factor, why
    return None


def int8_speedup(profile: DeviceProfile) -> tuple[float, str]:
    """INT8 over FP32 compute on ``profile``'s device: measured by ``edgetl device calibrate`` when the profile
    has it (``int8_speedup``), else from the CPU's ISA when ONNX Runtime runs on the CPU, else (an
    accelerator, or an unknown ISA) from the profile's own peaks."""
    if profile.int8_speedup is not None and profile.supports("int8"):
        measured = profile.int8_speedup
        return float(measured.value), f"measured: {measured.derived or measured.source}"
    if profile.runtime == "onnxruntime" and profile.cpu is not None:
        known = int8_speedup_for_isa(profile.cpu.isa)
        if known is not None:
            return known
    if not profile.supports("int8"):
        return 1.0, f"{profile.name} does not run INT8"
    return profile.peak_gflops("int8") / profile.peak_gflops("fp32"), "the profile's INT8 and FP32 peaks"


@dataclass(frozen=True)
class Roofline:
    """The device parameters the predictor uses, in SI units (FLOP/s, B/s, s)."""

    peak_flops: float
    bandwidth: float
    efficiency: dict[str, float]
    kernel_overhead: float

    @classmethod
    def from_profile(cls, profile: DeviceProfile, precision: str) -> Roofline:
        """Read the roofline of ``profile`` at ``precision`` (the profile must support it)."""
        profile.check_precision(precision)
        eff = profile.efficiency
        peak = profile.peak_gflops(precision)
        if precision == "int8":  # what the ISA does with INT8, not a figure typed into the profile
            peak = profile.peak_gflops("fp32") * int8_speedup(profile)[0]
        return cls(
            peak_flops=peak * 1e9,
            bandwidth=profile.memory.bandwidth_gbs.value * 1e9 * eff.bandwidth,
            efficiency={c: float(getattr(eff, c)) for c in OP_CLASSES},
            kernel_overhead=profile.kernel_overhead_us.value * 1e-6,
        )


@dataclass
class LatencyPrediction:
    """Predicted latency of one batch, with its breakdown per op class (milliseconds)."""

    latency_ms: float
    batch: int
    precision: str
    kernels: int
    compute_bound_ms: float
    memory_bound_ms: float
    overhead_ms: float
    by_class_ms: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        """Images per second at this batch size."""
        return 1000.0 * self.batch / self.latency_ms if self.latency_ms > 0 else float("inf")


@dataclass
class MemoryPrediction:
    """Predicted resident memory of the deployed model (MB = 1e6 bytes): the weights as the runtime holds them,
    the activations (arena) and the runtime's own constant."""

    memory_mb: float
    weights_mb: float
    activations_mb: float
    runtime_mb: float


def predict_latency(
    trace: CostTrace, profile: DeviceProfile | Roofline, precision: str, batch: int = 1
) -> LatencyPrediction:
    """Predict the latency of one batch of ``trace``'s model on a device.

    Args:
        trace: the model's cost trace (batch 1).
        profile: a device profile, or a :class:`Roofline` read from one.
        precision: ``fp32``, ``fp16`` or ``int8``.
        batch: the batch size.
    """
    if not isinstance(profile, Roofline) and profile.kernel_model() is not None and precision in ("fp32", "int8"):
        return _kernel_prediction(trace, profile, precision, batch)
    if precision == "int8" and not isinstance(profile, Roofline) and int8_speedup(profile)[0] <= 1.0:
        # No INT8 arithmetic speed-up: the quantize/dequantize work eats the saved memory traffic, and INT8
        # is predicted no faster than FP32 (on x86 without VNNI, depthwise nets even run slower).
        int8 = predict_latency(trace, Roofline.from_profile(profile, "int8"), "int8", batch)
        fp32 = predict_latency(trace, profile, "fp32", batch)
        return int8 if int8.latency_ms >= fp32.latency_ms else replace(fp32, precision="int8")
    roof = profile if isinstance(profile, Roofline) else Roofline.from_profile(profile, precision)
    bpe = BYTES_PER_ELEMENT[precision]
    total = compute_bound = memory_bound = overhead = 0.0
    kernels = 0
    by_class = dict.fromkeys(OP_CLASSES, 0.0)
    for op in trace.ops:
        if op.fused:
            continue
        t_compute = op.flops * batch / (roof.peak_flops * roof.efficiency[op.cls])
        t_memory = (op.weight + (op.act_in + op.act_out) * batch) * bpe / roof.bandwidth
        t = max(t_compute, t_memory) + roof.kernel_overhead
        if t_compute >= t_memory:
            compute_bound += t_compute
        else:
            memory_bound += t_memory
        overhead += roof.kernel_overhead
        by_class[op.cls] += t
        total += t
        kernels += 1
    return LatencyPrediction(
        latency_ms=total * 1e3,
        batch=batch,
        precision=precision,
        kernels=kernels,
        compute_bound_ms=compute_bound * 1e3,
        memory_bound_ms=memory_bound * 1e3,
        overhead_ms=overhead * 1e3,
        by_class_ms={k: v * 1e3 for k, v in by_class.items() if v},
    )


def _kernel_prediction(trace: CostTrace, profile: DeviceProfile, precision: str, batch: int) -> LatencyPrediction:
    """The sum over the model's kernels of the kernel timings measured on the device (FP32); INT8 scales it by what
    the roofline predicts INT8 saves over FP32 on this device (its measured or ISA-implied INT8 speed-up)."""
    from edgetl.device.kernel_model import KIND_CLASS, op_kernel  # deferred: only calibrated profiles need it

    total, by_kind = profile.kernel_model().predict_ms(trace, batch)
    scale = 1.0
    if precision == "int8":
        bare = profile.model_copy(update={"kernels": None})
        scale = predict_latency(trace, bare, "int8", batch).latency_ms / predict_latency(trace, bare, "fp32",
                                                                                          batch).latency_ms
    by_class: dict[str, float] = {}
    for kind, ms in by_kind.items():
        by_class[KIND_CLASS[kind]] = by_class.get(KIND_CLASS[kind], 0.0) + ms * scale
    compute = sum(by_class.get(c, 0.0) for c in ("conv", "depthwise", "matmul", "attention"))
    return LatencyPrediction(
        latency_ms=total * scale, batch=batch, precision=precision,
        kernels=sum(1 for op in trace.ops if op_kernel(op) is not None),
        compute_bound_ms=compute, memory_bound_ms=total * scale - compute, overhead_ms=0.0, by_class_ms=by_class,
    )


def predict_memory(
    trace: CostTrace, profile: DeviceProfile, precision: str, batch: int = 1
) -> MemoryPrediction:
    """Predict the resident memory of ``trace``'s model on a device at ``precision`` and ``batch``: with the
    profile's ``memory.rss_fit`` when it has one (fitted to measured peak RSS), else weights + activations +
    ``runtime_overhead_mb``."""
    bpe = BYTES_PER_ELEMENT[precision]
    weights = trace.params * bpe / 1e6
    acts = trace.peak_activation * batch * bpe / 1e6
    fit = profile.memory.rss_fit
    if fit is not None:
        conv = conv_weights(trace) * bpe / 1e6
        weights = conv * fit.conv_weights_factor + (weights - conv) * fit.weights_factor
        acts, runtime = acts * fit.activations_factor, fit.constant_mb
    else:
        runtime = float(profile.memory.runtime_overhead_mb.value)
    return MemoryPrediction(weights + acts + runtime, weights, acts, runtime)


def conv_weights(trace: CostTrace) -> int:
    """The weight elements of the model's convolutions (dense, grouped and depthwise), at most its parameters."""
    return min(trace.params, sum(op.weight for op in trace.ops if op.cls in ("conv", "depthwise")))


def model_size_mb(params: int, precision: str) -> float:
    """Size of the weights at ``precision`` in MB (1e6 bytes)."""
    return params * BYTES_PER_ELEMENT[precision] / 1e6


def features(trace: CostTrace, batch: int = 1) -> dict[str, Any]:
    """Per-op-class features used when fitting a profile to measurements."""
    out: dict[str, Any] = {f"flops_{c}": 0.0 for c in OP_CLASSES}
    out["bytes_elements"] = 0.0
    out["kernels"] = 0
    for op in trace.ops:
        if op.fused:
            continue
        out[f"flops_{op.cls}"] += op.flops * batch
        out["bytes_elements"] += op.weight + (op.act_in + op.act_out) * batch
        out["kernels"] += 1
    return out


@dataclass
class RooflineFit:
    """Device parameters fitted to measured latencies (see :func:`fit_roofline`)."""

    efficiency: dict[str, float]
    bandwidth_efficiency: float
    kernel_overhead_us: float
    ratios: list[float]  # predicted / measured for each fitted sample

    def within(self, tolerance: float) -> float:
        """Fraction of fitted samples whose prediction is within ``tolerance`` (0.2 = ±20%)."""
        ok = sum(1 for r in self.ratios if abs(r - 1.0) <= tolerance)
        return ok / len(self.ratios) if self.ratios else 0.0


def fit_roofline(
    samples: list[tuple[CostTrace, int, float]],
    peak_flops: float,
    bandwidth: float,
    precision: str = "fp32",
) -> RooflineFit:
    """Fit per-op-class efficiencies, the bandwidth efficiency and the per-kernel overhead.

    The fit minimises the squared log-ratio of predicted to measured latency (a relative error, so a
    0.5 ms model weighs as much as a 50 ms one), first with a non-negative linear model over per-class
    features to find a start, then with the full roofline (the ``max`` of compute and memory time).

    Args:
        samples: ``(trace, batch, measured_ms)`` triples.
        peak_flops: the device's peak at ``precision`` in FLOP/s (efficiencies are relative to it).
        bandwidth: peak memory bandwidth in B/s.
        precision: the precision the samples were measured at.
    """
    from scipy.optimize import least_squares, nnls  # deferred: heavy

    classes = list(OP_CLASSES)
    bpe = BYTES_PER_ELEMENT[precision]
    measured = np.array([m for _, _, m in samples]) * 1e-3
    feats = [features(t, b) for t, b, _ in samples]

    # linear start: t = sum_c flops_c * a_c + bytes * b + kernels * k, weighted by 1/measured
    design = np.array(
        [[f[f"flops_{c}"] for c in classes] + [f["bytes_elements"] * bpe, f["kernels"]] for f in feats]
    )
    w = 1.0 / measured
    coef, _ = nnls(design * w[:, None], measured * w)
    eff0 = []
    for i in range(len(classes)):
        has = design[:, i].sum() > 0
        eff0.append(min(1.0, 1.0 / (coef[i] * peak_flops)) if coef[i] > 0 and has else 0.5)
    bw0 = min(1.0, 1.0 / (coef[len(classes)] * bandwidth)) if coef[len(classes)] > 0 else 0.5
    k0 = max(coef[-1], 1e-7)
    x0 = np.log(np.array([*eff0, bw0, k0]))

    def predict_all(x: Any) -> Any:
        eff = dict(zip(classes, np.exp(x[: len(classes)]), strict=True))
        roof = Roofline(peak_flops, bandwidth * float(np.exp(x[len(classes)])), eff, float(np.exp(x[-1])))
        return np.array([predict_latency(t, roof, precision, b).latency_ms * 1e-3 for t, b, _ in samples])

    def residuals(x: Any) -> Any:
        return np.log(predict_all(x) / measured)

    lower = np.log(np.array([1e-4] * len(classes) + [1e-3, 1e-8]))
    upper = np.log(np.array([1.0] * len(classes) + [1.0, 1e-2]))
    x0 = np.clip(x0, lower + 1e-9, upper - 1e-9)
    result = least_squares(residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=0.2)
    x = result.x
    ratios = list(predict_all(x) / measured)
    return RooflineFit(
        efficiency={c: float(np.exp(v)) for c, v in zip(classes, x[: len(classes)], strict=True)},
        bandwidth_efficiency=float(np.exp(x[len(classes)])),
        kernel_overhead_us=float(np.exp(x[-1]) * 1e6),
        ratios=[float(r) for r in ratios],
    )


@dataclass
class MemoryFit:
    """The runtime's memory fitted to measured peak RSS (see :func:`fit_memory`), in MB = 1e6 bytes."""

    conv_weights_factor: float
    weights_factor: float
    activations_factor: float
    constant_mb: float
    ratios: list[float]  # predicted / measured for each fitted sample

    def predict_mb(self, conv_mb: float, other_mb: float, activations_mb: float) -> float:
        """The memory of a model with these convolution and other weights and peak live activations (MB)."""
        return (self.conv_weights_factor * conv_mb + self.weights_factor * other_mb
                + self.activations_factor * activations_mb + self.constant_mb)

    def within(self, tolerance: float) -> float:
        """Fraction of fitted samples whose prediction is within ``tolerance`` (0.25 = ±25%)."""
        return sum(1 for r in self.ratios if abs(r - 1.0) <= tolerance) / len(self.ratios) if self.ratios else 0.0


def fit_memory(samples: list[tuple[CostTrace, float]], precision: str = "fp32") -> MemoryFit:
    """Fit ``memory = a * conv weights + b * other weights + c * activations + d`` to measured peak RSS (MB),
    non-negative, weighted by 1/measured (a relative error, so a 30 MB model weighs as much as a 600 MB one).

    Args:
        samples: ``(trace, measured_mb)`` pairs at batch 1.
        precision: the precision the samples were measured at.
    """
    from scipy.optimize import nnls  # deferred: heavy

    bpe = BYTES_PER_ELEMENT[precision]
    design = np.array([[conv_weights(t) * bpe / 1e6, (t.params - conv_weights(t)) * bpe / 1e6,
                        t.peak_activation * bpe / 1e6, 1.0] for t, _ in samples])
    measured = np.array([m for _, m in samples])
    w = 1.0 / measured
    (a, b, c, d), _ = nnls(design * w[:, None], measured * w)
    fit = MemoryFit(float(a), float(b), float(c), float(d), [])
    fit.ratios = [fit.predict_mb(*f[:3]) / m for f, m in zip(design, measured, strict=True)]
    return fit
