"""Kernel-level latency model: time the runtime's kernels one by one, fit a model per kernel kind, and predict a
network as the sum over its kernels (what nn-Meter and LitePred do for mobile CPUs).

**Measuring.** ONNX Runtime's profiler reports every kernel it runs with its op, its input and output shapes and its
duration. :func:`profile_onnx` runs a model in its steady state (alone, warmed up, consecutive runs) under the
profiler and keeps each kernel's fastest run. Two sources feed a fit:

- whole calibration models, profiled as they run (each kernel in its real cache state, fused and laid out as the
  runtime does it);
- micro-graphs, one kernel each (:func:`micro_graph`), for a sample of the distinct convolutions and matrix
  products of the catalog's models (:func:`distinct_kernels`, :func:`spread_sample`), which widens the shapes the
  fit has seen.

The profiler adds a few microseconds to every kernel it times; :func:`measure_profiler_us` measures that with
chains of identical convolutions timed with and without it, and it is taken off every sample, which then holds
what the kernel costs in a running model (its compute and the runtime's cost around it).

**Kinds and features.** A kernel's kind and features (:data:`FEATURES`) are read the same way from a profiled
node (:func:`node_kernel`) and from an op of a cost trace (:func:`op_kernel`): convolutions by their channels
(padded to whole blocks where the runtime blocks them, :func:`blocked_channels`), kernel size, groups and spatial
sizes; matrix products by their dimensions; the memory-bound kinds (elementwise, norms, pools, softmax, data
movement) by the elements they read and write. Layout reorders and views have no counterpart in a trace; their
small cost is left out on both sides.

**Fit.** Per kind, ``time = overhead + work / rate``, with the logarithm of the rate linear in the logarithms of the
features (a convolution's efficiency grows with its channels and spatial size) and held within the rates the
samples showed; then corrected by the residuals of the nearest measured kernels in that log space, so a kernel the
device ran is predicted as it ran, and one it did not from its neighbours. A model whose weights exceed the
last-level cache reads them from DRAM on every run, so its kernels are no faster than their weights' bytes at the
measured streaming rate (:func:`measure_stream_gbs`).

Whole-model timings are a check on the model, never part of its fit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.runtime.bench import benchmark, random_input
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner, session_options
from edgetl.zoo.cost import CostTrace, OpCost

KINDS: tuple[str, ...] = (
    "conv", "depthwise", "grouped", "grouped_plain", "matmul", "bmm", "softmax", "norm", "pool", "elementwise",
    "data_movement",
)
#: The features of each kind, all positive; the fit works on their logarithms.
FEATURES: dict[str, tuple[str, ...]] = {
    "conv": ("flops", "cin", "cout", "kernel_area", "out_area", "in_area"),
    "depthwise": ("flops", "cin", "kernel_area", "out_area", "in_area"),
    "grouped": ("flops", "cin", "cout", "kernel_area", "out_area", "in_area", "group_width"),
    "grouped_plain": ("flops", "cin", "cout", "kernel_area", "out_area", "in_area", "group_width"),
    "matmul": ("flops", "m", "k", "n"),
    "bmm": ("flops", "batch", "m", "k", "n"),
    **{k: ("elements",) for k in ("softmax", "norm", "pool", "elementwise", "data_movement")},
}
#: Nearest measured kernels whose residuals correct a prediction, and the log-space distance beyond which a
#: neighbour no longer counts.
NEIGHBOURS = 4
_REACH = 1.0

_CONV_OPS = frozenset({"Conv", "FusedConv", "NchwcConv"})
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
#: Layout conversions ONNX Runtime inserts around its blocked convolutions; a cost trace has no such op, so they
#: are part of the runtime's cost between kernels.
_LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


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
    if op.fused and op.op not in UNFUSED_ACTIVATIONS:
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


def _memory_kind(op: OpCost) -> str:
    """The memory-bound kind of a trace op (a compute op without geometry is costed by its bytes, as elementwise)."""
    if op.cls == "attention":
        return "softmax"
    return op.cls if op.cls in ("norm", "pool", "data_movement") else "elementwise"


def blocked_channels(cin: int, cout: int, groups: int, block: int) -> tuple[int, int, bool]:
    """The channels ONNX Runtime's CPU convolution computes, and whether it runs blocked (NCHWc).

    On x86, ONNX Runtime rewrites convolutions into a blocked layout of ``block`` channels (16 with AVX-512, 8 with
    AVX2; :func:`measure_channel_block`), padding the channels up to whole blocks, when (as measured):

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
    if groups > 1 and groups == cin:
        return "depthwise", (flops, cin, area, out_area, in_area)
    if groups > 1:
        kind = "grouped" if blocked else "grouped_plain"
        return kind, (flops, cin, cout, area, out_area, in_area, max(1, cin // groups))
    return "conv", (flops, cin, cout, area, out_area, in_area)


# --- kernels from ONNX Runtime's profiler ----------------------------------------------------------


def node_kernel(op: str, inputs: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                parameters: int, block: int = 1) -> tuple[str, tuple[float, ...]] | None:
    """The kind and features of a kernel ONNX Runtime ran (``op``, input and output shapes, parameter bytes; the
    shapes of a blocked convolution are reported padded), or None for a layout reorder or a view (part of the
    runtime's cost between kernels). ``block``: see :func:`blocked_channels`."""
    if op in _LAYOUT_OPS or op in _VIEW_OPS:
        return None
    out = list(outputs[0]) if outputs else []
    if op in _CONV_OPS and len(inputs) >= 2 and len(inputs[0]) == 4 and len(inputs[1]) == 4 and len(out) == 4:
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
    if op in _MOVE_OPS:
        return "data_movement"
    return "elementwise"


@dataclass
class ProfiledRun:
    """A model run under ONNX Runtime's profiler in its steady state."""

    kernels: list[tuple[str, list[list[int]], list[list[int]], int, float]]  # op, inputs, outputs, param bytes, µs

    def samples(self, profiler_us: float = 0.0, block: int = 1) -> list[KernelSample]:
        """The kernels as samples (layout reorders and views left out), each less the profiler's own cost
        ``profiler_us``. ``block``: see :func:`blocked_channels`."""
        out = []
        for op, inputs, outputs, params, us in self.kernels:
            k = node_kernel(op, inputs, outputs, params, block)
            if k is not None:
                out.append(KernelSample(k[0], k[1], _less(us, profiler_us)))
        return out


def _less(us: float, profiler_us: float) -> float:
    """A profiled kernel's time less the profiler's own cost, kept at a fifth of the profiled time at least."""
    return max(us - profiler_us, 0.2 * us)


def profile_onnx(model: str | os.PathLike[str] | bytes, feeds: dict[str, np.ndarray] | Sequence[int],
                 threads: int | None, warmup: int = 5, runs: int = 10) -> ProfiledRun:
    """Run ``model`` ``warmup`` times, then ``runs`` times under ONNX Runtime's profiler, consecutively, and keep
    each kernel's fastest run.

    ``feeds`` is the inputs, or the shape of the model's one input (filled with random values). The session is
    set up as every edgetl session is (:func:`edgetl.runtime.onnxruntime.session_options`), with the profiler on.
    """
    import onnxruntime as ort  # deferred: heavy

    with tempfile.TemporaryDirectory(prefix="edgetl-prof-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        if not isinstance(feeds, dict):
            feeds = {session.get_inputs()[0].name: random_input(feeds)}
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    return _summarise(events, skip_runs=warmup)


def time_plain_us(model: bytes, feeds: dict[str, np.ndarray], threads: int | None, warmup: int = 5,
                  runs: int = 30) -> float:
    """The fastest of ``runs`` consecutive runs of ``model`` after ``warmup``, without the profiler (µs)."""
    runner = OnnxRuntimeRunner(model, providers="cpu", threads=threads, name="kernels")
    return benchmark(runner, feed=feeds, iterations=runs, warmup=warmup, cv_threshold=10.0).min * 1e3


def _summarise(events: list[dict[str, Any]], skip_runs: int) -> ProfiledRun:
    """Per-kernel minimum over the profiled runs after the first ``skip_runs``, in graph order."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_ts = runs[skip_runs]["ts"] if len(runs) > skip_runs else 0
    best: dict[str, tuple[str, list, list, int, float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e.get("ts", 0) < first_ts:
            continue
        args = e.get("args", {})
        name, us = e["name"], float(e.get("dur", 0))
        if name not in best or us < best[name][4]:
            best[name] = (str(args.get("op_name", "")), _shapes(args.get("input_type_shape")),
                          _shapes(args.get("output_type_shape")), int(args.get("parameter_size", 0) or 0), us)
    return ProfiledRun(list(best.values()))


def _shapes(items: Any) -> list[list[int]]:
    out = []
    for item in items or []:
        for dims in (item or {}).values():
            out.append([int(d) for d in dims])
    return out


# --- micro-graphs -----------------------------------------------------------------------------------


def distinct_kernels(traces: Iterable[CostTrace],
                     kinds: Sequence[str] = ("conv", "depthwise", "grouped", "grouped_plain", "matmul", "bmm")
                     ) -> list[OpCost]:
    """The distinct convolutions and matrix products (by geometry) the traces run, first seen first."""
    seen: dict[tuple, OpCost] = {}
    for trace in traces:
        for op in trace.ops:
            k = op_kernel(op)
            if k is not None and k[0] in kinds and op.geom and (op.cls, op.geom) not in seen:
                seen[(op.cls, op.geom)] = op
    return list(seen.values())


def spread_sample(ops: Sequence[OpCost], count: int) -> list[OpCost]:
    """Up to ``count`` of ``ops``, spread over each kind's range of FLOPs (sorted, evenly spaced picks per kind)."""
    by_kind: dict[str, list[tuple[float, OpCost]]] = {}
    for op in ops:
        kind, feats = op_kernel(op) or ("", (0.0,))
        by_kind.setdefault(kind, []).append((feats[0], op))
    total = len(ops)
    picked: list[OpCost] = []
    for items in by_kind.values():
        items.sort(key=lambda t: t[0])
        share = max(1, round(count * len(items) / max(1, total)))
        step = len(items) / min(share, len(items))
        picked += [items[int(i * step)][1] for i in range(min(share, len(items)))]
    return picked


def micro_graph(op: OpCost) -> tuple[bytes, dict[str, np.ndarray]]:
    """A one-kernel ONNX model of a trace's convolution, batch norm or matrix product (random weights; a product of
    two activations takes both as inputs), and its inputs."""
    g = op.geom
    if len(g) == 3:  # a batch norm, as runtimes run it: a 1x1 depthwise conv
        c, h, w = g
        g = (c, c, 1, 1, 1, 1, 1, 1, c, h, w, h, w)
    if len(g) == 13:
        cin, cout, kh, kw, sh, sw, dh, dw, groups, hin, win, hout, wout = g
        pad_h = max(0, (hout - 1) * sh + dh * (kh - 1) + 1 - hin)
        pad_w = max(0, (wout - 1) * sw + dw * (kw - 1) + 1 - win)
        pads = [pad_h // 2, pad_w // 2, pad_h - pad_h // 2, pad_w - pad_w // 2]
        return _conv_chain(cin, cout, (kh, kw), (sh, sw), (dh, dw), groups, (hin, win), pads, (hout, wout), 1)
    b, m, k, n = g
    if op.weight == 0 and op.cls == "attention":  # two activations: scores or the weighted sum of values
        return _batched_matmul(b, m, k, n)
    x_shape, y_shape = ([b, m, k], [b, m, n]) if b > 1 else ([m, k], [m, n])
    return _matmul(x_shape, k, n, y_shape)


def _conv_chain(cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                groups: int, size: tuple[int, int], pads: list[int], out: tuple[int, int], count: int
                ) -> tuple[bytes, dict[str, np.ndarray]]:
    """``count`` identical convolutions in a row (``count`` > 1 needs a shape-preserving one)."""
    from onnx import helper, numpy_helper  # deferred: heavy

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(count):
        w = rng.standard_normal((cout, cin // groups, *kernel), dtype=np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"y{i}"], strides=list(stride),
                                      dilations=list(dilation), group=groups, pads=pads))
        prev = f"y{i}"
    x = rng.standard_normal((1, cin, *size), dtype=np.float32)
    return _model_bytes(nodes, x.shape, prev, [1, cout, *out], inits), {"x": x}


def _matmul(x_shape: list[int], k: int, n: int, y_shape: list[int]) -> tuple[bytes, dict[str, np.ndarray]]:
    from onnx import helper, numpy_helper  # deferred: heavy

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    x = rng.standard_normal(x_shape, dtype=np.float32)
    return _model_bytes([node], x.shape, "y", y_shape, [w]), {"x": x}


def _batched_matmul(b: int, m: int, k: int, n: int) -> tuple[bytes, dict[str, np.ndarray]]:
    from onnx import helper  # deferred: heavy

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((b, m, k), dtype=np.float32), rng.standard_normal((b, k, n), dtype=np.float32)
    node = helper.make_node("MatMul", ["x", "v"], ["y"])
    return _model_bytes([node], x.shape, "y", [b, m, n], [], {"v": y.shape}), {"x": x, "v": y}


def _model_bytes(nodes: list[Any], x_shape: Sequence[int], out: str, out_shape: Sequence[int],
                 inits: list[Any], more_inputs: dict[str, Sequence[int]] | None = None) -> bytes:
    from onnx import TensorProto, helper  # deferred: heavy

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in {"x": x_shape, **(more_inputs or {})}.items()]
    graph = helper.make_graph(nodes, "kernels", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


#: Shape-preserving convolutions ``(channels, size, kernel, groups)`` timed in chains to measure what the profiler
#: adds to each kernel it times.
PROFILER_CHAINS: tuple[tuple[int, int, int, int], ...] = (
    (32, 56, 3, 32), (64, 28, 3, 64), (128, 14, 3, 128), (32, 28, 1, 1), (96, 14, 1, 1), (256, 14, 1, 1),
)


def measure_profiler_us(threads: int | None, chains: Sequence[tuple[int, int, int, int]] = PROFILER_CHAINS
                        ) -> float:
    """What ONNX Runtime's profiler adds to each kernel it times, less the runtime's own cost between kernels.

    A chain of 16 identical convolutions and one of 8 are timed without the profiler: their difference over 8 is
    what one kernel costs in a running model (its compute and the runtime's cost around it). The same kernels under
    the profiler take longer by a near-constant few microseconds (its timestamps, and worker threads that stop
    spinning while it records); the median of that excess over :data:`PROFILER_CHAINS` is returned.
    """
    excess = []
    for c, size, k, groups in chains:
        conv = (c, c, (k, k), (1, 1), (1, 1), groups, (size, size), [k // 2] * 4, (size, size))
        long, feeds = _conv_chain(*conv, 16)
        short, _ = _conv_chain(*conv, 8)
        per_kernel = (time_plain_us(long, feeds, threads) - time_plain_us(short, feeds, threads)) / 8
        profiled = profile_onnx(long, feeds, threads, warmup=3, runs=10)
        times = [us for op, *_, us in profiled.kernels if op not in _LAYOUT_OPS]
        excess.append(float(np.median(times)) - per_kernel)
    return max(0.0, float(np.median(excess)))


def measure_run_overhead_us(threads: int | None) -> float:
    """What one run of a model costs beyond its kernels (binding the input and output, starting the executor): the
    fastest plain run of a one-kernel model whose kernel does next to nothing (a ReLU of 8 values)."""
    from onnx import helper  # deferred: heavy

    model = _model_bytes([helper.make_node("Relu", ["x"], ["y"])], [1, 8], "y", [1, 8], [])
    return time_plain_us(model, {"x": np.ones((1, 8), np.float32)}, threads, warmup=20, runs=200)


def measure_channel_block(threads: int | None) -> int:
    """The channel block of ONNX Runtime's blocked convolutions on this CPU (16 with AVX-512, 8 with AVX2), read
    from the padded shapes the profiler reports for a 1x1 convolution with 20 output channels; 1 where the runtime
    does not block them (no padding to 8 or 16)."""
    model, feeds = _conv_chain(8, 20, (1, 1), (1, 1), (1, 1), 1, (8, 8), [0, 0, 0, 0], (8, 8), 1)
    run = profile_onnx(model, feeds, threads, warmup=0, runs=1)
    reported = next((outs[0][1] for op, ins, outs, *_ in run.kernels if op in _CONV_OPS and outs), 20)
    return next((b for b in (16, 8) if reported == -(-20 // b) * b), 1)


def measure_stream_gbs(threads: int | None, cache_mb: float) -> float:
    """The rate (GB/s) at which a matrix-vector product streams weights from DRAM: batch 1, weights of four times
    the last-level cache (64 MB at least), timed under the profiler."""
    k = 4096
    n = max(4096, math.ceil(max(64.0, 4 * cache_mb) * 1e6 / 4 / k / 256) * 256)
    model, feeds = _matmul([1, k], k, n, [1, n])
    run = profile_onnx(model, feeds, threads, warmup=2, runs=5)
    us = min(us for *_, us in run.kernels)
    return k * n * 4 / us / 1e3


# --- the model ------------------------------------------------------------------------------------


@dataclass
class KindFit:
    """The fit of one kind::

        time_us = overhead_us + work / rate,   log(rate) = rate_coef[0] + rate_coef[1:] . x

    with ``work`` the first feature (FLOPs, or elements for the memory-bound kinds) and ``x`` the standardised
    logarithms of the features. The rate is held within the range the samples showed (no extrapolation to a speed
    the device never reached), and the prediction is corrected by the residuals of the nearest samples.
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
        """The weighted residuals of each row's nearest samples (rows of standardised log-features)."""
        if not self.samples:
            return np.zeros(len(x))
        if self._xs is None:
            self._xs = self._x([s.features for s in self.samples])
        dist = np.sqrt(((x[:, None, :] - self._xs[None, :, :]) ** 2).sum(axis=2))
        order = np.argsort(dist, axis=1)[:, :NEIGHBOURS]
        weights = np.maximum(0.0, 1.0 - np.take_along_axis(dist, order, axis=1) / _REACH) ** 2
        residuals = np.asarray(self.residuals)[order]
        return (weights * residuals).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


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
        run_us: what a run costs beyond its kernels (:func:`measure_run_overhead_us`), once per prediction.
    """

    fits: dict[str, KindFit]
    threads: int
    stream_gbs: float = 0.0
    cache_mb: float = 0.0
    block: int = 1
    run_us: float = 0.0

    def kernel_us(self, kind: str, feats: Sequence[float]) -> float:
        """One kernel's predicted time in microseconds."""
        return float(self._kind_us(kind, np.asarray([feats], dtype=float))[0])

    def _kind_us(self, kind: str, feats: np.ndarray) -> np.ndarray:
        """Predicted times of kernels of one kind. A kind too few kernels measured takes the fit of its nearest
        kind: a batched matrix product the matmul fit, a grouped convolution the other grouped fit, anything else
        the elementwise fit on its bytes."""
        fit = self.fits.get(kind)
        if fit is None and kind == "bmm" and "matmul" in self.fits:
            fit, feats = self.fits["matmul"], np.column_stack([feats[:, 0], feats[:, 1] * feats[:, 2], feats[:, 3:]])
        elif fit is None and kind in ("grouped", "grouped_plain"):
            fit = self.fits.get("grouped_plain" if kind == "grouped" else "grouped")
        if fit is None:
            fit = self.fits.get("elementwise")
            if fit is None:
                return np.zeros(len(feats))
            feats = feats[:, -1:] if kind in ("matmul", "bmm") else feats[:, :1]
        return fit.predict_many(feats)

    def predict_ms(self, trace: CostTrace, batch: int = 1, bytes_per_element: int = 4
                   ) -> tuple[float, dict[str, float]]:
        """The predicted latency of one batch (ms) and its split per kind (ms)."""
        from_dram = self.stream_gbs > 0 and trace.params * bytes_per_element > self.cache_mb * 1e6
        rows: dict[str, tuple[list[tuple[float, ...]], list[float]]] = {}
        for op in trace.ops:
            k = op_kernel(op, batch, self.block)
            if k is not None:
                feats, dram_us = rows.setdefault(k[0], ([], []))
                feats.append(k[1])
                dram_us.append(op.weight * bytes_per_element / (self.stream_gbs * 1e3) if from_dram else 0.0)
        by_kind = {kind: float(np.maximum(self._kind_us(kind, np.asarray(feats, dtype=float)), dram).sum()) / 1e3
                   for kind, (feats, dram) in rows.items()}
        return sum(by_kind.values()) + self.run_us / 1e3, by_kind

    def to_dict(self) -> dict[str, Any]:
        """``threads``, ``stream_gbs``, ``cache_mb``, ``block``, ``run_us`` and the sample rows, as a profile's
        ``kernels`` stores them."""
        return {"threads": self.threads, "stream_gbs": round(self.stream_gbs, 2), "cache_mb": round(self.cache_mb, 1),
                "block": self.block, "run_us": round(self.run_us, 2),
                "samples": [s.to_row() for f in self.fits.values() for s in f.samples]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelModel:
        """Fit the model to a profile's ``kernels`` (the fit is deterministic, so only the samples are stored)."""
        return fit_kernel_model([KernelSample.from_row(r) for r in d["samples"]], int(d["threads"]),
                                float(d.get("stream_gbs", 0.0)), float(d.get("cache_mb", 0.0)), int(d.get("block", 1)),
                                float(d.get("run_us", 0.0)))


def fit_kernel_model(samples: Sequence[KernelSample], threads: int, stream_gbs: float = 0.0,
                     cache_mb: float = 0.0, block: int = 1, run_us: float = 0.0) -> KernelModel:
    """Fit every kind with at least 3 samples (the same kernel timed more than once counts once, at its median)."""
    by_kind: dict[str, list[KernelSample]] = {}
    for s in dedupe(samples):
        by_kind.setdefault(s.kind, []).append(s)
    fits = {kind: fit_kind(items) for kind, items in by_kind.items() if len(items) >= 3}
    return KernelModel(fits, threads, stream_gbs, cache_mb, block, run_us)


def dedupe(samples: Iterable[KernelSample]) -> list[KernelSample]:
    """One sample per distinct kernel (kind and features), at the median of its times."""
    times: dict[tuple[str, tuple[float, ...]], list[float]] = {}
    for s in samples:
        times.setdefault((s.kind, tuple(round(f, 1) for f in s.features)), []).append(s.us)
    return [KernelSample(kind, feats, float(np.median(us))) for (kind, feats), us in times.items()]
