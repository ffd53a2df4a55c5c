"""Kernel timing on this machine: run ONNX Runtime under its profiler and read every kernel it runs, build one-kernel
micro-graphs, and measure what the kernel model needs besides (the profiler's own cost, the cost of a run, the
runtime's channel block, the DRAM streaming rate).

ONNX Runtime's profiler reports every kernel it runs with its op, its input and output shapes and its duration.
:func:`profile_onnx` runs a model in its steady state (alone, warmed up, consecutive runs) under the profiler and
keeps each kernel's fastest run. Two sources feed the fit (:mod:`edgetl.device.kernel_model`):

- whole calibration models, profiled as they run;
- micro-graphs, one kernel each (:func:`micro_graph`), for a sample of the distinct convolutions and matrix
  products of the catalog's models (:func:`distinct_kernels`, :func:`spread_sample`).

The profiler adds a few microseconds to every kernel it times; :func:`measure_profiler_us` measures that with
chains of identical convolutions timed with and without it, and it is taken off every sample
(:meth:`ProfiledRun.samples`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.device.kernel_model import COMPUTE_KINDS, CONV_OPS, LAYOUT_OPS, KernelSample, node_kernel, op_kernel
from edgetl.runtime.bench import benchmark, random_input
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner, session_options
from edgetl.zoo.cost import CostTrace, OpCost


@dataclass
class ProfiledRun:
    """A model run under ONNX Runtime's profiler in its steady state."""

    kernels: list[tuple[str, list[list[int]], list[list[int]], int, float]]  # op, inputs, outputs, param bytes, µs

    def samples(self, profiler_us: float = 0.0, block: int = 1) -> list[KernelSample]:
        """The kernels as samples (layout reorders and views left out), each less the profiler's own cost
        ``profiler_us``. ``block``: see :func:`edgetl.device.kernel_model.blocked_channels`."""
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


#: Shape-preserving convolutions ``(channels, size, kernel, groups)`` timed in chains to measure what the profiler
#: adds to each kernel it times.
PROFILER_CHAINS: tuple[tuple[int, int, int, int], ...] = (
    (32, 56, 3, 32), (64, 28, 3, 64), (128, 14, 3, 128), (32, 28, 1, 1), (96, 14, 1, 1), (256, 14, 1, 1),
)


def measure_profiler_us(threads: int | None, chains: Sequence[tuple[int, int, int, int]] = PROFILER_CHAINS
                        ) -> float:
    """What ONNX Runtime's profiler adds to each kernel it times, less the runtime's own cost between kernels: the
    median over :data:`PROFILER_CHAINS` of :func:`profiler_excess_us`."""
    return max(0.0, float(np.median([profiler_excess_us(chain, threads) for chain in chains])))


def profiler_excess_us(chain: tuple[int, int, int, int], threads: int | None) -> float:
    """What the profiler adds to one kernel of a chain ``(channels, size, kernel, groups)`` of identical convolutions.

    A chain of 16 and one of 8 are timed without the profiler: their difference over 8 is what one kernel costs in a
    running model (its compute and the runtime's cost around it). The same kernels under the profiler take longer by
    a near-constant few microseconds (its timestamps, and worker threads that stop spinning while it records).
    """
    c, size, k, groups = chain
    conv = (c, c, (k, k), (1, 1), (1, 1), groups, (size, size), [k // 2] * 4, (size, size))
    long, feeds = _conv_chain(*conv, 16)
    short, _ = _conv_chain(*conv, 8)
    per_kernel = (time_plain_us(long, feeds, threads) - time_plain_us(short, feeds, threads)) / 8
    profiled = profile_onnx(long, feeds, threads, warmup=3, runs=10)
    times = [us for op, *_, us in profiled.kernels if op not in LAYOUT_OPS]
    return float(np.median(times)) - per_kernel


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
    reported = next((outs[0][1] for op, ins, outs, *_ in run.kernels if op in CONV_OPS and outs), 20)
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
