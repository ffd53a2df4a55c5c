"""Kernel-level latency model: fit a model per kernel kind to a device's kernel timings, and predict a network as
the sum over its kernels (what nn-Meter and LitePred do for mobile CPUs). Numpy only (and scipy for the fit): the
timings are measured by :mod:`edgetl.calibrate.kernel_timing` and stored in a profile's ``kernels``.

**Samples.** Two sources feed a fit: whole calibration models, profiled as they run (each kernel in its real cache
state, fused and laid out as the runtime does it), and micro-graphs, one kernel each, for a sample of the distinct
convolutions and matrix products of the catalog's models, which widens the shapes the fit has seen. The profiler's
own cost is taken off every sample, which then holds what the kernel costs in a running model (its compute and the
runtime's cost around it).

**Kinds and features.** A kernel's kind and features (:data:`FEATURES`) are read the same way from a profiled
node (:func:`node_kernel`) and from an op of a cost trace (:func:`op_kernel`): convolutions by their channels
(padded to whole blocks where the runtime blocks them, :func:`blocked_channels`), kernel size, groups and spatial
sizes; matrix products by their dimensions; the memory-bound kinds (elementwise, transcendental activations, norms,
pools, softmax, copies, transposes) by the elements they read and write. Views that only relabel a tensor have no
counterpart in a trace; their small cost is left out on both sides. Views ONNX Runtime runs as copies (a transpose,
a slice) a trace records (:data:`edgetl.zoo.cost.COPYING_VIEWS`). Layout reorders are in no trace, but they are not
small (a quarter of GhostNet's time, a fifth of ShuffleNet's): ONNX Runtime inserts them where a tensor leaves or
enters its blocked (NCHWc) layout, and :func:`layout_kernels` finds those places in a trace by following its rules.

**Fit.** Per kind, ``time = overhead + work / rate``, with the logarithm of the rate linear in the logarithms of the
features (a convolution's efficiency grows with its channels and spatial size) and held within the rates the
samples showed; then corrected by the residuals of the nearest measured kernels in that log space, shrunk toward the
trend: each residual is one noisy timing (two calibrations in a row corrected the same kernel by +12% and -12%),
and taken whole it moved every kernel near it with it. A model whose weights exceed the
last-level cache reads them from DRAM on every run, so its kernels are no faster than their weights' bytes at the
measured streaming rate.

Whole-model timings are a check on the model, never part of its fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgetl.zoo.cost import COPYING_VIEWS, TRANSPOSES, CostTrace, OpCost

#: The compute kinds: convolutions and matrix products, the kernels micro-graphs are made of and a model's
#: coverage counts (:meth:`KernelModel.coverage`).
COMPUTE_KINDS: tuple[str, ...] = ("conv", "depthwise", "grouped", "grouped_plain", "matmul", "bmm")
#: Every kernel kind, and the trace's op class a prediction reports it under (``by_class_ms``).
KIND_CLASS: dict[str, str] = {
    "conv": "conv", "depthwise": "depthwise", "grouped": "depthwise", "grouped_plain": "depthwise",
    "matmul": "matmul", "bmm": "attention", "softmax": "attention", "norm": "norm", "pool": "pool",
    "elementwise": "elementwise", "activation": "elementwise", "data_movement": "data_movement",
    "transpose": "data_movement", "reorder": "data_movement",
}
KINDS: tuple[str, ...] = tuple(KIND_CLASS)
#: The features of each kind, all positive; the fit works on their logarithms.
FEATURES: dict[str, tuple[str, ...]] = {
    "conv": ("flops", "cin", "cout", "kernel_area", "out_area", "in_area"),
    "depthwise": ("flops", "cin", "kernel_area", "out_area", "in_area"),
    "grouped": ("flops", "cin", "cout", "kernel_area", "out_area", "in_area", "group_width"),
    "grouped_plain": ("flops", "cin", "cout", "kernel_area", "out_area", "in_area", "group_width"),
    "matmul": ("flops", "m", "k", "n"),
    "bmm": ("flops", "batch", "m", "k", "n"),
    **{k: ("elements",) for k in ("softmax", "norm", "pool", "elementwise", "activation", "data_movement",
                                  "transpose", "reorder")},
}
#: Nearest measured kernels whose residuals correct a prediction, the log-space distance beyond which a neighbour
#: no longer counts, and the weight of the trend against them (as many neighbours at distance 0 with no residual).
#: Chosen on two calibrations in a row and one held-out run (``tools/bench/predictor_accuracy.py``): 4 neighbours
#: taken whole agreed within ±5% for 75% of the catalog; 8 shrunk by 4 for 89%, and as close to the stopwatch.
NEIGHBOURS = 8
_REACH = 1.0
_TREND_WEIGHT = 4.0

CONV_OPS = frozenset({"Conv", "FusedConv", "NchwcConv"})
_MATMUL_OPS = frozenset({"Gemm", "MatMul", "FusedMatMul", "FusedGemm"})
_NORM_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "BatchNormalization",
                       "InstanceNormalization", "GroupNorm", "SimplifiedLayerNormalization"})
_POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
                       "ReduceMax", "ReduceSum", "NchwcMaxPool", "NchwcAveragePool", "NchwcGlobalAveragePool"})
_MOVE_OPS = frozenset({"Concat", "Transpose", "Slice", "Split", "Gather", "Pad", "Expand", "Resize", "Tile",
                       "DepthToSpace", "SpaceToDepth", "Cast", "Upsample"})
#: Ops that only relabel a tensor (views in a cost trace, which has no such kernel): their small cost is part of
#: the runtime's cost between kernels.
_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "ConstantOfShape"})
#: Activations a cost trace counts as fused into the conv or matmul before them (TensorRT fuses them) that ONNX
#: Runtime's CPU kernels run on their own (SiLU as ``QuickGelu``, GELU as ``Gelu``/``BiasGelu``).
UNFUSED_ACTIVATIONS = frozenset({"silu", "silu_", "gelu", "gelu_", "mish"})
#: Layout conversions ONNX Runtime inserts around its blocked convolutions (kind ``reorder``; where a trace has them:
#: :func:`layout_reorders`).
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})
_PAD_OPS = frozenset({"constant_pad_nd", "pad"})
#: The transposes a layout reorder does itself (it writes or reads channels-last), by their ``geom``.
_TO_CHANNELS_LAST, _FROM_CHANNELS_LAST = (0, 2, 3, 1), (0, 3, 1, 2)
#: Activations computed with a transcendental function (kind ``activation``), as a trace and as ONNX Runtime name
#: them: per element several times an add's cost (ConvNeXt's GELU ran 2.3x the time the elementwise fit gave it).
_TRANSCENDENTAL = frozenset({"gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "mish",
                             "mish_", "elu", "elu_", "softplus", "exp", "erf"})
_ORT_TRANSCENDENTAL = frozenset({"Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Sigmoid", "Tanh", "Erf", "Exp",
                                 "Softplus", "Mish", "Elu"})


@dataclass(frozen=True)
class KernelSample:
    """One kernel timed on the device: its kind, features (see :data:`FEATURES`) and time in microseconds."""

    kind: str
    features: tuple[float, ...]
    us: float

    def to_row(self) -> list[Any]:
        return [self.kind, *[round(f, 1) for f in self.features], round(self.us, 2)]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> KernelSample:
        return cls(str(row[0]), tuple(float(v) for v in row[1:-1]), float(row[-1]))


# --- kernels from a cost trace -------------------------------------------------------------------


def op_kernel(op: OpCost, batch: int = 1, block: int = 1) -> tuple[str, tuple[float, ...]] | None:
    """The kind and features of a trace op at ``batch``, or None for an op the runtime fuses into another.

    ``block`` is the channel block of the runtime's blocked convolutions (:func:`blocked_channels`).
    """
    if not runs_alone(op):
        return None
    g = op.geom
    if len(g) == 3 and op.cls == "norm":  # a batch norm no conv absorbs: runtimes run it as a 1x1 depthwise conv
        c, h, w = g
        g = (c, c, 1, 1, 1, 1, 1, 1, c, h, w, h, w)
    if len(g) == 13 and op.cls in ("conv", "depthwise", "norm"):
        cin, cout, kh, kw, groups, hin, win, hout, wout = g[0], g[1], g[2], g[3], g[8], g[9], g[10], g[11], g[12]
        cin, cout, blocked = blocked_channels(cin, cout, groups, block)
        groups = cin if g[8] == g[0] else groups  # a depthwise conv stays depthwise on padded channels
        return _conv_kernel(cin, cout, kh * kw, groups, hin * win * batch, hout * wout * batch, blocked or block <= 1)
    if op.cls in ("matmul", "attention") and len(g) == 4:
        b, m, k, n = g
        if op.weight > 0 or op.cls == "matmul":
            return "matmul", (2.0 * b * m * k * n * batch, b * m * batch, k, n)
        return "bmm", (2.0 * b * m * k * n * batch, b * batch, m, k, n)
    kind = _memory_kind(op)
    return kind, (max(1.0, float((op.act_in + op.act_out) * batch)),)


def runs_alone(op: OpCost) -> bool:
    """Whether ONNX Runtime's CPU kernels run ``op`` as a kernel of its own: an unfused op, an activation it does not
    fuse (:data:`UNFUSED_ACTIVATIONS`) or a view it copies (:data:`edgetl.zoo.cost.COPYING_VIEWS`)."""
    return not op.fused or op.op in UNFUSED_ACTIVATIONS or op.op in COPYING_VIEWS


def _memory_kind(op: OpCost) -> str:
    """The memory-bound kind of a trace op (a compute op without geometry is costed by its bytes, as elementwise)."""
    if op.cls == "attention":
        return "softmax"
    if op.op in TRANSPOSES:
        return "transpose"
    if op.cls in ("norm", "pool", "data_movement"):
        return op.cls
    return "activation" if op.op in _TRANSCENDENTAL else "elementwise"


def blocked_channels(cin: int, cout: int, groups: int, block: int) -> tuple[int, int, bool]:
    """The channels ONNX Runtime's CPU convolution computes, and whether it runs blocked (NCHWc).

    On x86, ONNX Runtime rewrites convolutions into a blocked layout of ``block`` channels (16 with AVX-512, 8 with
    AVX2; measured by :func:`edgetl.calibrate.kernel_timing.measure_channel_block`), padding the channels up to
    whole blocks, when (as measured):

    - dense: the output channels are a multiple of 4; fewer input channels than a block are read unblocked;
    - depthwise: the channels are a multiple of 4;
    - grouped: the input and output channels of each group are whole blocks (no padding). Other grouped
      convolutions run unblocked, on a much slower path.
    """
    if block <= 1:
        return cin, cout, False
    def up(c: int) -> int:
        return -(-c // block) * block
    if groups == 1:
        if cout % 4 or (cin >= block and cin % 4):
            return cin, cout, False
        return (cin if cin < block else up(cin)), up(cout), True
    if groups == cin == cout:
        return (up(cin), up(cout), True) if cin % 4 == 0 else (cin, cout, False)
    blocked = (cin // groups) % block == 0 and (cout // groups) % block == 0
    return cin, cout, blocked


def _conv_kernel(cin: int, cout: int, area: int, groups: int, in_area: int, out_area: int,
                 blocked: bool = True) -> tuple[str, tuple]:
    flops = 2.0 * cout * out_area * area * cin / max(1, groups)
    if groups > 1 and groups == cin == cout:  # with a channel multiplier, it runs on the grouped path
        return "depthwise", (flops, cin, area, out_area, in_area)
    if groups > 1:
        kind = "grouped" if blocked else "grouped_plain"
        return kind, (flops, cin, cout, area, out_area, in_area, max(1, cin // groups))
    return "conv", (flops, cin, cout, area, out_area, in_area)


def layout_reorders(trace: CostTrace, block: int) -> list[float]:
    """The elements of each layout reorder ONNX Runtime runs for ``trace`` (:func:`layout_kernels`)."""
    return layout_kernels(trace, block)[0]


def layout_kernels(trace: CostTrace, block: int) -> tuple[list[float], set[int]]:
    """The elements of each layout reorder ONNX Runtime runs for ``trace`` with blocked convolutions of ``block``
    channels (none where it does not block them), and the indices of the transposes those reorders do (to or from
    channels-last, right after or before a blocked convolution), as its NCHWc rewrite places them, followed along
    the trace:

    - a blocked convolution whose input is not blocked reorders it in (unless it has fewer channels than a block);
    - the blocked layout carries on through pools, same-shape elementwise ops and concatenations while the channels
      are whole blocks, through batch norms (run as depthwise convolutions) and through padding (folded into the
      convolution after it);
    - any other op on a blocked tensor (a broadcast, a transpose, a layer norm, a matrix product, an unblocked
      convolution) reorders it out first.

    A trace has no data flow, so a branch is followed as if it were the main path. Checked against the reorders
    ONNX Runtime ran in 32 catalog models: the same elements within ±20% for 25 of them.
    """
    out: list[float] = []
    absorbed: set[int] = set()
    if block <= 1:
        return out, absorbed
    blocked, channels, spatial, prev = False, 0, 0, -1
    for i, op in enumerate(trace.ops):
        if not runs_alone(op):
            continue
        g = op.geom
        if len(g) == 13 and op.cls in ("conv", "depthwise"):
            if blocked_channels(g[0], g[1], g[8], block)[2]:
                if not blocked and g[0] >= block:
                    out.append(float(op.act_in))
                    absorbed |= {prev} if prev >= 0 and _permutes(trace.ops[prev], _FROM_CHANNELS_LAST) else set()
                blocked, channels, spatial = True, g[1], g[11] * g[12]
            elif blocked:
                out.append(float(op.act_in))
                blocked = False
        elif blocked and not _keeps_blocks(op, channels, spatial, block):
            same = op.act_in in (op.act_out, 2 * op.act_out)
            out.append(float(op.act_out if op.cls == "elementwise" and not same else op.act_in))
            absorbed |= {i} if _permutes(op, _TO_CHANNELS_LAST) else set()
            blocked = False
        elif blocked and op.op == "cat":
            channels = op.act_out // max(1, spatial)
        elif blocked and op.cls == "pool":
            spatial = max(1, op.act_out // max(1, channels))
        prev = i
    return out, absorbed


def _permutes(op: OpCost, order: tuple[int, ...]) -> bool:
    return op.op in TRANSPOSES and op.geom == order


def _keeps_blocks(op: OpCost, channels: int, spatial: int, block: int) -> bool:
    """Whether ONNX Runtime runs ``op`` on a tensor of ``channels`` in its blocked layout."""
    whole = channels % block == 0
    if op.op in _PAD_OPS:  # folded into the convolution after it
        return True
    if op.cls == "norm" and len(op.geom) == 3:
        return op.geom[0] % 4 == 0
    if op.op == "cat":
        return whole and spatial > 0 and (op.act_out // spatial) % block == 0
    if op.cls == "pool":
        return whole
    return whole and op.cls == "elementwise" and op.act_in in (op.act_out, 2 * op.act_out)


# --- kernels from ONNX Runtime's profiler ----------------------------------------------------------


def node_kernel(op: str, inputs: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                parameters: int, block: int = 1) -> tuple[str, tuple[float, ...]] | None:
    """The kind and features of a kernel ONNX Runtime ran (``op``, input and output shapes, parameter bytes; the
    shapes of a blocked convolution are reported padded), or None for a view (part of the runtime's cost between
    kernels). ``block``: see :func:`blocked_channels`."""
    if op in _VIEW_OPS:
        return None
    if op in LAYOUT_OPS and inputs and outputs:  # one side is padded to whole blocks: count the tensor's own size
        return "reorder", (2.0 * min(math.prod(inputs[0]), math.prod(outputs[0])),)
    out = list(outputs[0]) if outputs else []
    if op in CONV_OPS and len(inputs) >= 2 and len(inputs[0]) == 4 and len(inputs[1]) == 4 and len(out) == 4:
        x, w = inputs[0], inputs[1]
        groups = max(1, x[1] // max(1, w[1]))
        blocked = blocked_channels(x[1], w[0], groups, block)[2] or block <= 1
        return _conv_kernel(x[1], w[0], w[2] * w[3], groups, x[0] * x[2] * x[3], out[0] * out[2] * out[3], blocked)
    if op in _MATMUL_OPS and inputs and inputs[0] and out:
        a, n = inputs[0], out[-1]
        b = inputs[1] if len(inputs) > 1 else []
        if len(a) >= 3 and len(b) == len(a):  # two activations (attention); ONNX Runtime lists pre-packed weights not
            batch = math.prod(out[:-2])
            return "bmm", (2.0 * batch * out[-2] * a[-1] * n, batch, out[-2], a[-1], n)
        m = math.prod(a[:-1]) if len(a) > 1 else 1
        return "matmul", (2.0 * m * a[-1] * n, m, a[-1], n)
    elements = sum(math.prod(s) for s in inputs if s) + sum(math.prod(s) for s in outputs if s)
    return _ort_memory_kind(op), (max(1.0, float(elements)),)


def _ort_memory_kind(op: str) -> str:
    if op == "Softmax":
        return "softmax"
    if op in _NORM_OPS:
        return "norm"
    if op in _POOL_OPS:
        return "pool"
    if op == "Transpose":
        return "transpose"
    if op in _MOVE_OPS:
        return "data_movement"
    return "activation" if op in _ORT_TRANSCENDENTAL else "elementwise"


#: The kind whose fit predicts a kind without one.
_NEAREST_KIND = {"grouped": "grouped_plain", "grouped_plain": "grouped", "activation": "elementwise",
                 "transpose": "data_movement"}


# --- the model ------------------------------------------------------------------------------------


@dataclass
class KindFit:
    """The fit of one kind::

        time_us = overhead_us + work / rate,   log(rate) = rate_coef[0] + rate_coef[1:] . x

    with ``work`` the first feature (FLOPs, or elements for the memory-bound kinds) and ``x`` the standardised
    logarithms of the features. The rate is held within the range the samples showed (no extrapolation to a speed
    the device never reached), and the prediction is corrected by the residuals of the nearest samples, shrunk
    toward the trend.
    """

    overhead_us: float
    rate_coef: list[float]
    center: list[float]
    scale: list[float]
    rate_range: tuple[float, float]
    samples: list[KernelSample]
    residuals: list[float] = field(default_factory=list)
    _xs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def _x(self, feats: Any) -> np.ndarray:
        logs = np.log(np.maximum(np.asarray(feats, dtype=float), 1e-9))
        return (logs - np.asarray(self.center)) / np.asarray(self.scale)

    def predict_many(self, feats: np.ndarray) -> np.ndarray:
        """The predicted times (µs) of kernels with these features (one row each)."""
        return self._trend(feats) * np.exp(self._correction(self._x(feats)))

    def _trend(self, feats: np.ndarray) -> np.ndarray:
        x = self._x(feats)
        rate = np.exp(np.minimum(50.0, self.rate_coef[0] + x @ np.asarray(self.rate_coef[1:])))
        return self.overhead_us + feats[:, 0] / np.clip(rate, *self.rate_range)

    def _correction(self, x: np.ndarray) -> np.ndarray:
        """The weighted residuals of each row's nearest samples (rows of standardised log-features), shrunk toward
        the trend by :data:`_TREND_WEIGHT`."""
        if not self.samples:
            return np.zeros(len(x))
        if self._xs is None:
            self._xs = self._x([s.features for s in self.samples])
        dist = np.sqrt(((x[:, None, :] - self._xs[None, :, :]) ** 2).sum(axis=2))
        order = np.argsort(dist, axis=1)[:, :NEIGHBOURS]
        weights = np.maximum(0.0, 1.0 - np.take_along_axis(dist, order, axis=1) / _REACH) ** 2
        residuals = np.asarray(self.residuals)[order]
        return (weights * residuals).sum(axis=1) / (np.maximum(weights.sum(axis=1), 1.0) + _TREND_WEIGHT)


def fit_kind(samples: Sequence[KernelSample], ridge: float = 1e-2) -> KindFit:
    """Fit one kind's overhead and log-linear rate to its samples (robust least squares on the log of the time)."""
    from scipy.optimize import least_squares  # deferred: heavy

    feats = np.array([s.features for s in samples], dtype=float)
    us = np.maximum(np.array([s.us for s in samples]), 0.1)
    logs = np.log(np.maximum(feats, 1e-9))
    center, scale = logs.mean(axis=0), logs.std(axis=0)
    scale[scale < 1e-6] = 1.0
    x = (logs - center) / scale
    work = feats[:, 0]

    def predict(p: np.ndarray) -> np.ndarray:
        return np.exp(p[0]) + work / np.exp(np.clip(p[1] + x @ p[2:], -50, 50))

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.concatenate([np.log(predict(p)) - np.log(us), math.sqrt(ridge) * p[2:]])

    p0 = np.zeros(2 + x.shape[1])
    p0[0] = math.log(max(0.1, 0.5 * float(np.percentile(us, 5))))
    p0[1] = math.log(float(np.median(work / us)))
    p = least_squares(residuals, p0, loss="soft_l1", f_scale=0.3).x
    overhead = float(np.exp(p[0]))
    rates = work / np.maximum(us - overhead, 0.05 * us)
    fit = KindFit(overhead, [float(v) for v in p[1:]], [float(c) for c in center], [float(v) for v in scale],
                  (float(rates.min()), float(rates.max())), list(samples))
    fit.residuals = [float(r) for r in np.log(us) - np.log(fit._trend(feats))]
    return fit


@dataclass
class KernelModel:
    """Per-kind kernel fits; predicts a trace as the sum of its kernels.

    Attributes:
        fits: the fit of each kind that was measured.
        threads: the threads the kernels were timed with.
        stream_gbs: the rate at which a kernel streams weights from DRAM (GB/s), measured with a matrix-vector
            product whose weights exceed the last-level cache.
        cache_mb: the last-level cache (MB); a model whose weights exceed it reads every weight from DRAM on every
            run, so no kernel can be faster than its weights' bytes at ``stream_gbs``.
        block: the channel block of the runtime's blocked convolutions (:func:`blocked_channels`; 1: none).
        run_us: what a run costs beyond its kernels
            (:func:`edgetl.calibrate.kernel_timing.run_overhead_model`), once per prediction.
        run_scale, run_slope, run_kernel_us: a whole run's fastest time over the sum of its kernels', measured on
            the calibration models (:func:`edgetl.calibrate.kernel_plan.with_run_scale`), as a trend in the model's
            mean kernel time: :meth:`run_factor`.
    """

    fits: dict[str, KindFit]
    threads: int
    stream_gbs: float = 0.0
    cache_mb: float = 0.0
    block: int = 1
    run_us: float = 0.0
    run_scale: float = 1.0
    run_slope: float = 0.0
    run_kernel_us: tuple[float, float] = (1.0, 1.0)

    def run_factor(self, mean_kernel_us: float) -> float:
        """A whole run's time over the sum of its kernels' for a model whose kernels take ``mean_kernel_us`` on
        average: ``run_scale`` in the middle of ``run_kernel_us`` (on a log scale), ``run_slope`` more per e-fold,
        held at the ends of the range."""
        lo, hi = np.log(self.run_kernel_us)
        x = float(np.clip(np.log(max(mean_kernel_us, 1e-9)), lo, hi))
        return self.run_scale + self.run_slope * (x - (lo + hi) / 2)

    def kernel_us(self, kind: str, feats: Sequence[float]) -> float:
        """One kernel's predicted time in microseconds."""
        return float(self._kind_us(kind, np.asarray([feats], dtype=float))[0])

    def _kind_us(self, kind: str, feats: np.ndarray) -> np.ndarray:
        """Predicted times of kernels of one kind. A kind too few kernels measured (or a profile made before it
        was a kind) takes the fit of its nearest kind: a batched matrix product the matmul fit, others
        :data:`_NEAREST_KIND`, anything else the elementwise fit on its bytes."""
        fit = self.fits.get(kind)
        if fit is None and kind == "bmm" and "matmul" in self.fits:
            fit, feats = self.fits["matmul"], np.column_stack([feats[:, 0], feats[:, 1] * feats[:, 2], feats[:, 3:]])
        elif fit is None:
            fit = self.fits.get(_NEAREST_KIND.get(kind, ""))
        if fit is None:
            fit = self.fits.get("elementwise")
            if fit is None:
                return np.zeros(len(feats))
            feats = feats[:, -1:] if kind in ("matmul", "bmm") else feats[:, :1]
        return fit.predict_many(feats)

    def predict_ms(self, trace: CostTrace, batch: int = 1, bytes_per_element: int = 4
                   ) -> tuple[float, dict[str, float]]:
        """The predicted latency of one batch (ms) and its split per kind (ms)."""
        by_kind, count = self.kernel_sums(trace, batch, bytes_per_element)
        factor = self.run_factor(sum(by_kind.values()) * 1e3 / max(1, count))
        return factor * (sum(by_kind.values()) + self.run_us / 1e3), {k: factor * v for k, v in by_kind.items()}

    def kernel_sums(self, trace: CostTrace, batch: int = 1, bytes_per_element: int = 4
                    ) -> tuple[dict[str, float], int]:
        """The sum of the predicted times of the trace's kernels per kind (ms, not scaled to whole runs), and how
        many kernels it has."""
        from_dram = self.stream_gbs > 0 and trace.params * bytes_per_element > self.cache_mb * 1e6
        rows: dict[str, tuple[list[tuple[float, ...]], list[float]]] = {}
        reorders, absorbed = layout_kernels(trace, self.block)
        for i, op in enumerate(trace.ops):
            k = op_kernel(op, batch, self.block) if i not in absorbed else None
            if k is not None:
                feats, dram_us = rows.setdefault(k[0], ([], []))
                feats.append(k[1])
                dram_us.append(op.weight * bytes_per_element / (self.stream_gbs * 1e3) if from_dram else 0.0)
        if reorders:
            rows["reorder"] = ([(2.0 * e * batch,) for e in reorders], [0.0] * len(reorders))
        by_kind = {kind: float(np.maximum(self._kind_us(kind, np.asarray(feats, dtype=float)), dram).sum()) / 1e3
                   for kind, (feats, dram) in rows.items()}
        return by_kind, sum(len(feats) for feats, _ in rows.values())

    def coverage(self, trace: CostTrace, batch: int = 1) -> tuple[int, int]:
        """How many of the trace's compute kernels (:data:`COMPUTE_KINDS`) the model measured itself (a sample of
        the same :func:`kernel_key`), and how many it has: a model made only of measured kernels is predicted
        in-sample, whatever its name."""
        seen = {kernel_key(s.kind, s.features) for f in self.fits.values() for s in f.samples}
        kernels = [k for op in trace.ops if (k := op_kernel(op, batch, self.block)) is not None
                   and k[0] in COMPUTE_KINDS]
        return sum(kernel_key(*k) in seen for k in kernels), len(kernels)

    def to_dict(self) -> dict[str, Any]:
        """``threads``, ``stream_gbs``, ``cache_mb``, ``block``, the run's (``run_us``, ``run_scale``,
        ``run_slope``, ``run_kernel_us``) and the sample rows, as a profile's ``kernels`` stores them."""
        return {"threads": self.threads, "stream_gbs": round(self.stream_gbs, 2), "cache_mb": round(self.cache_mb, 1),
                "block": self.block, "run_us": round(self.run_us, 2), "run_scale": round(self.run_scale, 4),
                "run_slope": round(self.run_slope, 4), "run_kernel_us": [round(v, 1) for v in self.run_kernel_us],
                "samples": [s.to_row() for f in self.fits.values() for s in f.samples]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelModel:
        """Fit the model to a profile's ``kernels`` (the fit is deterministic, so only the samples are stored)."""
        model = fit_kernel_model([KernelSample.from_row(r) for r in d["samples"]], int(d["threads"]),
                                 float(d.get("stream_gbs", 0.0)), float(d.get("cache_mb", 0.0)),
                                 int(d.get("block", 1)), float(d.get("run_us", 0.0)), float(d.get("run_scale", 1.0)))
        lo, hi = d.get("run_kernel_us", (1.0, 1.0))
        return replace(model, run_slope=float(d.get("run_slope", 0.0)), run_kernel_us=(float(lo), float(hi)))


def fit_kernel_model(samples: Sequence[KernelSample], threads: int, stream_gbs: float = 0.0,
                     cache_mb: float = 0.0, block: int = 1, run_us: float = 0.0, run_scale: float = 1.0
                     ) -> KernelModel:
    """Fit every kind with at least 3 samples (the same kernel timed more than once counts once, at its median)."""
    by_kind: dict[str, list[KernelSample]] = {}
    for s in dedupe(samples):
        by_kind.setdefault(s.kind, []).append(s)
    fits = {kind: fit_kind(items) for kind, items in by_kind.items() if len(items) >= 3}
    return KernelModel(fits, threads, stream_gbs, cache_mb, block, run_us, run_scale)


def kernel_key(kind: str, features: Iterable[float]) -> tuple[str, tuple[float, ...]]:
    """What makes a kernel distinct: its kind and its features, rounded as a profile stores them."""
    return kind, tuple(round(f, 1) for f in features)


def dedupe(samples: Iterable[KernelSample]) -> list[KernelSample]:
    """One sample per distinct kernel (:func:`kernel_key`), at the median of its times."""
    times: dict[tuple[str, tuple[float, ...]], list[float]] = {}
    for s in samples:
        times.setdefault(kernel_key(s.kind, s.features), []).append(s.us)
    return [KernelSample(kind, feats, float(np.median(us))) for (kind, feats), us in times.items()]
