"""Kernel timing, the host's half: the ONNX graphs a calibration times (one-kernel micro-graphs, chains of
convolutions, the reference kernel of the noise guard, the probes of the run's cost, the channel block and the DRAM
streaming rate), the choice of kernels to time, and what the raw timings mean.

Two sources feed the fit (:mod:`edgetl.device.kernel_model`):

- whole calibration models, profiled as they run;
- micro-graphs, one kernel each (:func:`micro_graph`), for a sample of the distinct convolutions and matrix
  products of the catalog's models (:func:`distinct_kernels`, :func:`spread_sample`).

The graphs are built with the ``onnx`` package; they are run by :mod:`edgetl.calibrate.profiler` (numpy and ONNX
Runtime only), here or on a board. The profiler adds a few microseconds to every kernel it times;
:func:`profiler_excess_us` reads that from chains of identical convolutions (:data:`PROFILER_CHAINS`) timed with and
without it, and it is taken off every sample (:meth:`~edgetl.calibrate.profiler.ProfiledRun.samples`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from edgetl.calibrate.noise import REFERENCE_CONV
from edgetl.calibrate.profiler import ProfiledRun, profile_onnx
from edgetl.device.kernel_model import COMPUTE_KINDS, CONV_OPS, LAYOUT_OPS, op_kernel
from edgetl.zoo.cost import CostTrace, OpCost

# --- micro-graphs -----------------------------------------------------------------------------------


def distinct_kernels(traces: Iterable[CostTrace], kinds: Sequence[str] = COMPUTE_KINDS) -> list[OpCost]:
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


def reference_model(channels: int = REFERENCE_CONV[0], size: int = REFERENCE_CONV[1], length: int = REFERENCE_CONV[2]
                    ) -> bytes:
    """The reference kernel of :class:`~edgetl.calibrate.noise.NoiseGuard` as an ONNX model (seeded random
    weights)."""
    from onnx import TensorProto, helper, numpy_helper  # deferred: heavy

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(length):
        w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.05
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "reference", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


#: Shape-preserving convolutions ``(channels, size, kernel, groups)`` timed in chains to measure what the profiler
#: adds to each kernel it times.
PROFILER_CHAINS: tuple[tuple[int, int, int, int], ...] = (
    (32, 56, 3, 32), (64, 28, 3, 64), (128, 14, 3, 128), (32, 28, 1, 1), (96, 14, 1, 1), (256, 14, 1, 1),
)
#: The lengths of the two chains of :func:`profiler_chain` timed without the profiler (the longer also with it).
CHAIN_LENGTHS = (16, 8)


def profiler_chain(chain: tuple[int, int, int, int], length: int) -> bytes:
    """A chain of ``length`` identical shape-preserving convolutions ``(channels, size, kernel, groups)``."""
    c, size, k, groups = chain
    return _conv_chain(c, c, (k, k), (1, 1), (1, 1), groups, (size, size), [k // 2] * 4, (size, size), length)[0]


def profiler_excess_us(measured: dict[str, Any]) -> float:
    """What the profiler adds to one kernel of a chain, from what a ``chains`` window measured
    (:func:`edgetl.calibrate.profiler.run_window`).

    The two chains timed without the profiler differ by what the extra kernels cost in a running model (their
    compute and the runtime's cost around them). The same kernels under the profiler take longer by a near-constant
    few microseconds (its timestamps, and worker threads that stop spinning while it records).
    """
    per_kernel = (measured["long_us"] - measured["short_us"]) / (CHAIN_LENGTHS[0] - CHAIN_LENGTHS[1])
    times = [k[4] for k in measured["kernels"] if k[0] not in LAYOUT_OPS]
    return float(np.median(times)) - per_kernel


def run_overhead_model() -> bytes:
    """A one-kernel model whose kernel does next to nothing (a ReLU of 8 values): its fastest plain run is what one
    run of a model costs beyond its kernels (binding the input and output, starting the executor)."""
    from onnx import helper  # deferred: heavy

    return _model_bytes([helper.make_node("Relu", ["x"], ["y"])], [1, 8], "y", [1, 8], [])


def channel_block_model() -> bytes:
    """A 1x1 convolution with 20 output channels, whose shapes under the profiler tell the channel block
    (:func:`channel_block`)."""
    return _conv_chain(8, 20, (1, 1), (1, 1), (1, 1), 1, (8, 8), [0, 0, 0, 0], (8, 8), 1)[0]


def channel_block(run: ProfiledRun) -> int:
    """The channel block of ONNX Runtime's blocked convolutions (16 with AVX-512, 8 with AVX2), read from the padded
    shapes the profiler reported for :func:`channel_block_model`; 1 where the runtime does not block them (no
    padding to 8 or 16)."""
    reported = next((outs[0][1] for op, ins, outs, *_ in run.kernels if op in CONV_OPS and outs), 20)
    return next((b for b in (16, 8) if reported == -(-20 // b) * b), 1)


def measure_channel_block(threads: int | None) -> int:
    """The channel block of ONNX Runtime's blocked convolutions on this CPU (see :func:`channel_block`)."""
    return channel_block(profile_onnx(channel_block_model(), None, threads, warmup=0, runs=1))


#: Weight sizes (MB) of the matrix-vector products that find how much of the last-level cache holds a model's
#: weights (:func:`usable_cache_mb`), and how much faster than DRAM a size must stream to count as cached.
CACHE_PROBES_MB = (16.0, 32.0, 64.0, 128.0, 256.0)
CACHED_SPEEDUP = 1.25


def dram_probe_mb(cache_mb: float) -> float:
    """The weights (MB) of the matrix-vector product that measures how fast weights stream from DRAM: four times
    the last-level cache ``cache_mb``, 64 MB at least."""
    return max(64.0, 4 * cache_mb)


def cache_probes_mb(cache_mb: float) -> list[float]:
    """The :data:`CACHE_PROBES_MB` below the DRAM probe of a machine whose last-level cache is ``cache_mb``."""
    return [mb for mb in CACHE_PROBES_MB if mb < dram_probe_mb(cache_mb)]


def stream_shape(weights_mb: float) -> tuple[int, int]:
    """``(k, n)`` of a matrix-vector product whose weights are ``weights_mb`` MB."""
    k = 4096
    return k, max(256, math.ceil(weights_mb * 1e6 / 4 / k / 256) * 256)


def stream_model(weights_mb: float) -> bytes:
    """The matrix-vector product of :func:`stream_shape`, at batch 1. Its weights are a second input, filled with
    random values where it runs: the file is a few hundred bytes, not gigabytes to send to a board (four times a
    server's last-level cache can be 2 GB)."""
    from onnx import helper  # deferred: heavy

    k, n = stream_shape(weights_mb)
    return _model_bytes([helper.make_node("MatMul", ["x", "w"], ["y"])], [1, k], "y", [1, n], [], {"w": [k, n]})


def stream_gbs(run: ProfiledRun, weights_mb: float) -> float:
    """The rate (GB/s) at which :func:`stream_model` streamed its weights, from its fastest profiled kernel."""
    k, n = stream_shape(weights_mb)
    return k * n * 4 / min(kernel[4] for kernel in run.kernels) / 1e3


def usable_cache_mb(rates: dict[float, float], dram_gbs: float, cache_mb: float) -> float:
    """How many MB of weights a model may have and still read them from the cache: the largest probe (weights MB ->
    GB/s) that streamed :data:`CACHED_SPEEDUP` times faster than DRAM (``dram_gbs``). A machine's reported
    last-level cache can be far more than one tenant gets (a VM that reports 480 MB streams 256 MB from DRAM), or
    its whole size where every probe is cached; where none is, half the smallest probe at most."""
    cached = [mb for mb, gbs in rates.items() if gbs >= CACHED_SPEEDUP * dram_gbs]
    if rates and len(cached) == len(rates):
        return cache_mb
    return max(cached) if cached else min(cache_mb, min(rates, default=2 * cache_mb) / 2)
