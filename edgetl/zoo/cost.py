"""Per-op cost trace of a model, recorded on the meta device without weights.

One forward pass at batch 1 runs under a ``TorchDispatchMode`` on meta tensors, so every aten op is
seen with its shapes but nothing is computed or allocated. For each op that does work the trace keeps:

- ``cls``: the op class, one of :data:`OP_CLASSES` (conv, depthwise/grouped conv, matmul/linear,
  attention, norm, elementwise/activation, pool, data movement);
- ``flops``: from ``torch.utils.flop_counter.flop_registry`` (2 FLOPs per multiply-accumulate) where
  torch has a formula, else one FLOP per output element;
- ``weight``: elements of parameters the op reads (counted once per op);
- ``act_in`` / ``act_out``: elements of activations read and written;
- ``fused``: whether an inference runtime fuses it into the conv/matmul that produced its input.

Fusion follows what TensorRT and ONNX Runtime do at inference: BatchNorm after a convolution is folded
into it; an activation (ReLU, SiLU, GELU, ...) or a same-shape residual add whose input comes from a
conv/matmul chain is fused into that kernel. Broadcast multiplies (squeeze-excitation), LayerNorm and
softmax stay separate kernels. View ops (reshape, transpose, expand, ...) cost nothing, but those an ONNX graph
runs as copies (Transpose, Slice, Gather, Split, Expand) are recorded, fused (TensorRT folds them; ONNX Runtime's
CPU kernels copy), just before the op that reads them: see :data:`COPYING_VIEWS`.

Peak live activation elements come from tracking when each output is freed during the pass.

Traces are cached as JSON under the cache folder, keyed by torch version, architecture and resolution;
activations and FLOPs scale linearly with batch, weights do not (see :mod:`edgetl.device.latency`).

This module knows nothing of the catalog; the trace of a catalog model is
:func:`edgetl.zoo.model_cost.trace_model`.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from typing import Any

from edgetl._io import atomic_write_json, cache_dir

log = logging.getLogger(__name__)

_TRACE_SCHEMA = 5

OP_CLASSES: tuple[str, ...] = (
    "conv",
    "depthwise",
    "matmul",
    "attention",
    "norm",
    "elementwise",
    "pool",
    "data_movement",
)
COMPUTE_CLASSES = frozenset({"conv", "depthwise", "matmul"})

_FREE_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "select", "slice",
        "unsqueeze", "squeeze", "alias", "split", "split_with_sizes", "as_strided", "as_strided_",
        "detach", "lift_fresh", "lift_fresh_copy", "empty", "empty_like", "new_empty", "new_zeros",
        "zeros", "zeros_like", "ones", "ones_like", "scalar_tensor", "full", "arange", "unbind",
        "_reshape_alias", "unflatten", "flatten", "chunk", "narrow", "dim", "sym_size", "clone_meta",
        "_local_scalar_dense", "is_same_size", "new_ones", "new_full", "fill_", "zero_",
    }
)
#: Views an ONNX export runs as a copy when they move data (a permutation of dimensions longer than 1, a slice,
#: split or gather of part of a tensor, a broadcast to a larger one). A copy the trace already has (the clone a
#: reshape of a transposed tensor makes) stands for the view's, and so does a matrix product that reads a tensor
#: with its last two dimensions swapped (ONNX Runtime fuses that transpose).
COPYING_VIEWS = frozenset({"permute", "transpose", "t", "slice", "narrow", "select", "split", "split_with_sizes",
                           "unbind", "expand"})
#: The views that permute dimensions (ONNX Transpose).
TRANSPOSES = frozenset({"permute", "transpose", "t"})
#: Ops that copy their input whole: a copy pending on it is theirs.
_FULL_COPIES = frozenset({"clone", "contiguous", "_to_copy", "copy_"})
#: Views that only relabel a tensor: a copy pending on their input is pending on their output.
_RELABEL_VIEWS = frozenset({"view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "flatten",
                            "unflatten", "alias", "detach"})
_CONV_OPS = frozenset({"convolution", "conv2d", "_convolution", "cudnn_convolution", "mkldnn_convolution"})
_MATMUL_OPS = frozenset({"mm", "addmm", "linear", "matmul", "einsum", "baddbmm_linear"})
_ATTENTION_OPS = frozenset(
    {
        "bmm", "baddbmm", "_softmax", "_safe_softmax", "softmax", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
    }
)
_FOLDED_NORMS = frozenset(
    {"native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "batch_norm"}
)
_NORM_OPS = _FOLDED_NORMS | frozenset({"native_layer_norm", "native_group_norm", "layer_norm", "group_norm"})
_POOL_OPS = frozenset(
    {
        "max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
        "mean", "adaptive_max_pool2d", "amax", "sum",
    }
)
_MOVE_OPS = frozenset(
    {
        "cat", "constant_pad_nd", "roll", "index", "clone", "copy_", "_to_copy", "stack", "pad",
        "index_select", "gather", "contiguous", "repeat", "upsample_nearest2d", "upsample_bilinear2d",
        "channel_shuffle", "pixel_shuffle",
    }
)
_UNARY_FUSABLE = frozenset(
    {
        "relu", "relu_", "silu", "silu_", "gelu", "gelu_", "hardswish", "hardswish_", "hardsigmoid",
        "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "hardtanh", "hardtanh_",
        "clamp_min", "clamp_min_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish",
    }
)
_BINARY_FUSABLE = frozenset({"add", "add_", "mul", "mul_", "sub", "sub_"})


def classify(op: str, args: tuple[Any, ...]) -> str | None:
    """Return the op class of an aten op name, or ``None`` for an op that costs nothing (a view)."""
    if op in _FREE_OPS:
        return None
    if op in _CONV_OPS:
        groups = args[8] if len(args) > 8 else 1
        return "depthwise" if isinstance(groups, int) and groups > 1 else "conv"
    if op in _MATMUL_OPS:
        return "matmul"
    if op in _ATTENTION_OPS:
        return "attention"
    if op in _NORM_OPS:
        return "norm"
    if op in _POOL_OPS:
        return "pool"
    if op in _MOVE_OPS:
        return "data_movement"
    return "elementwise"


def geometry(op: str, args: tuple[Any, ...], out: Any) -> tuple[int, ...]:
    """The shape parameters that set a compute kernel's speed (empty for other ops):

    - convolutions: ``(cin, cout, kh, kw, stride_h, stride_w, dilation_h, dilation_w, groups, hin, win, hout, wout)``;
    - matrix products: ``(batch, m, k, n)``;
    - batch norms: the input's ``(channels, height, width)``;
    - transposes (recorded by :func:`_view_copy`): the order of the input's dimensions in the output.
    """
    try:
        if op in _CONV_OPS and out is not None:
            x, w = args[0], args[1]
            stride, dilation, groups = list(args[3]), list(args[5]), int(args[8])
            return (int(x.shape[1]), int(w.shape[0]), int(w.shape[2]), int(w.shape[3]), *_pair(stride),
                    *_pair(dilation), groups, int(x.shape[2]), int(x.shape[3]), int(out.shape[2]), int(out.shape[3]))
        if op in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if op in ("addmm", "baddbmm") else (args[0], args[1])
            batch = int(a.shape[0]) if a.dim() == 3 else 1
            return (batch, int(a.shape[-2]), int(a.shape[-1]), int(b.shape[-1]))
        if op in _FOLDED_NORMS and args[0].dim() == 4:
            return tuple(int(d) for d in args[0].shape[1:])
    except (IndexError, TypeError, AttributeError, ValueError):  # an unusual overload: no geometry
        return ()
    return ()


def _pair(v: list[Any]) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if v else (1, 1)


@dataclass
class OpCost:
    """The cost of one op at batch 1. Element counts, not bytes: the precision sets the byte width."""

    op: str
    cls: str
    flops: float
    weight: int
    act_in: int
    act_out: int
    fused: bool
    geom: tuple[int, ...] = ()

    def to_row(self) -> list[Any]:
        return [self.op, self.cls, self.flops, self.weight, self.act_in, self.act_out, int(self.fused), list(self.geom)]

    @classmethod
    def from_row(cls, row: list[Any]) -> OpCost:
        return cls(row[0], row[1], float(row[2]), int(row[3]), int(row[4]), int(row[5]), bool(row[6]),
                   tuple(int(v) for v in row[7]))


@dataclass
class CostTrace:
    """The per-op cost of one architecture at one resolution, batch 1."""

    model: str
    resolution: int
    torch_version: str
    params: int
    peak_activation: int
    input_elements: int
    ops: list[OpCost] = field(default_factory=list)

    @property
    def flops(self) -> float:
        """Total FLOPs per image."""
        return sum(o.flops for o in self.ops)

    @property
    def kernels(self) -> int:
        """Number of kernels an inference runtime would launch (ops that are not fused)."""
        return sum(1 for o in self.ops if not o.fused)

    def by_class(self) -> dict[str, dict[str, float]]:
        """FLOPs, activation elements and kernel count per op class (unfused ops only for kernels)."""
        out = {c: {"flops": 0.0, "act": 0.0, "weight": 0.0, "kernels": 0.0} for c in OP_CLASSES}
        for o in self.ops:
            d = out[o.cls]
            d["flops"] += o.flops
            d["weight"] += o.weight
            if not o.fused:
                d["act"] += o.act_in + o.act_out
                d["kernels"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": _TRACE_SCHEMA,
            "model": self.model,
            "resolution": self.resolution,
            "torch_version": self.torch_version,
            "params": self.params,
            "peak_activation": self.peak_activation,
            "input_elements": self.input_elements,
            "ops": [o.to_row() for o in self.ops],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostTrace:
        if d.get("schema") != _TRACE_SCHEMA:
            raise ValueError("old trace schema")
        return cls(
            model=d["model"],
            resolution=d["resolution"],
            torch_version=d["torch_version"],
            params=d["params"],
            peak_activation=d["peak_activation"],
            input_elements=d["input_elements"],
            ops=[OpCost.from_row(r) for r in d["ops"]],
        )


def _numel(t: Any) -> int:
    return int(t.numel())


class _Recorder:
    """Per-op costs and the live activation memory of one forward pass, fed op by op by a dispatch mode."""

    def __init__(self, params: set[int], flop_registry: dict[Any, Any]) -> None:
        self.params = params
        self.flop_registry = flop_registry
        self.ops: list[OpCost] = []
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def track(self, t: Any) -> None:
        n = _numel(t)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)

    def _is_weight(self, t: Any) -> bool:
        return id(t) in self.params or getattr(t, "_et_w", False)

    def on_op(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any, flat_in: list[Any],
              flat_out: list[Any]) -> None:
        name = func.overloadpacket.__name__
        cls = classify(name, args)
        if cls is None:
            self._propagate(flat_in, flat_out)
            self._view(name, args, flat_in, flat_out)
            return
        acts = [a for a in flat_in if not self._is_weight(a)]
        taken = self._emit_copies(acts, name in _FULL_COPIES, name in _MATMUL_OPS or name in ("bmm", "baddbmm"))
        weight = sum(_numel(a) for a in flat_in if self._is_weight(a))
        act_out = sum(_numel(o) for o in flat_out[:1])
        root, fused = self._fusion(name, acts)
        idx = len(self.ops)
        flops = self._flops(func, args, kwargs, out, act_out, cls)
        geom = geometry(name, args, flat_out[0] if flat_out else None)
        if taken is not None and taken.op.op in TRANSPOSES:  # the copy of a transposed tensor: ONNX's Transpose
            name, geom = taken.op.op, taken.op.geom
        self.ops.append(OpCost(name, cls, flops, weight, sum(_numel(a) for a in acts), act_out, fused, geom))
        # a batch norm no conv absorbs runs as a 1x1 depthwise conv (ONNX Runtime, TensorRT): what follows fuses into it
        new_root = root if fused else (idx if cls in COMPUTE_CLASSES or name in _FOLDED_NORMS else None)
        for o in flat_out[:1]:
            o._et_root = new_root
            if not name.endswith("_"):  # in-place ops allocate nothing
                self.track(o)

    def _propagate(self, flat_in: list[Any], flat_out: list[Any]) -> None:
        """Views and constants cost nothing; they carry weight-ness and the fusion root on."""
        src = flat_in[0] if flat_in else None
        for o in flat_out:
            if src is not None and self._is_weight(src):
                o._et_w = True
            elif src is not None:
                o._et_root = getattr(src, "_et_root", None)

    def _view(self, name: str, args: Any, flat_in: list[Any], flat_out: list[Any]) -> None:
        """Carry a pending copy through a view that moves no data, or make a view ONNX runs as a copy pending on its
        outputs (the copy it reads first runs before it)."""
        src = flat_in[0] if flat_in else None
        if src is None or self._is_weight(src):
            return
        pending = getattr(src, "_et_copy", None)
        copy = _view_copy(name, args, src, flat_out)
        if copy is None and name not in _RELABEL_VIEWS and name not in COPYING_VIEWS:
            return
        if copy is not None:
            self._emit_copies([src], False, False)
            pending = copy
        for o in flat_out:
            o._et_copy = pending

    def _emit_copies(self, acts: list[Any], copies: bool, matmul: bool) -> _PendingCopy | None:
        """Record the pending copies ``acts`` carry, once each, before the op that reads them, unless that op
        ``copies`` its input itself (then return the copy it takes over) or is a ``matmul`` reading a tensor with
        its last two dimensions swapped."""
        taken = None
        for a in acts:
            pending = getattr(a, "_et_copy", None)
            if pending is None or pending.done:
                continue
            pending.done = True
            if copies:
                taken = pending
            elif not (matmul and pending.last_two):
                self.ops.append(pending.op)
        return taken

    def _flops(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any, act_out: int, cls: str) -> float:
        packet = func.overloadpacket
        if packet in self.flop_registry:
            try:
                return float(self.flop_registry[packet](*args, **kwargs, out_val=out))
            except Exception:  # a formula that does not accept these arguments
                return float(act_out)
        return float(act_out) if cls != "data_movement" else 0.0

    @staticmethod
    def _fusion(name: str, acts: list[Any]) -> tuple[int | None, bool]:
        """The compute op this one would fuse into (the root of its input), and whether it does."""
        root = next((r for r in (getattr(a, "_et_root", None) for a in acts) if r is not None), None)
        if root is None:
            return None, False
        if name in _FOLDED_NORMS or name in _UNARY_FUSABLE:
            return root, True
        if name in _BINARY_FUSABLE and len(acts) <= 2:
            return root, len({tuple(a.shape) for a in acts}) == 1 or len(acts) == 1
        return root, False


@dataclass
class _PendingCopy:
    """A view ONNX runs as a copy, recorded when an op first reads it."""

    op: OpCost
    last_two: bool = False
    done: bool = False


def _view_copy(name: str, args: Any, src: Any, outs: list[Any]) -> _PendingCopy | None:
    """The copy an ONNX graph makes for the view ``name`` of ``src``, or None where it moves no data."""
    if name not in COPYING_VIEWS:
        return None
    n_in, n_out = _numel(src), sum(_numel(o) for o in outs)
    shape = tuple(src.shape)
    if name in TRANSPOSES:
        order = _permutation(name, args, len(shape))
        moved = [d for d in order if shape[d] > 1]
        if moved == sorted(moved):
            return None
        last_two = len(order) >= 2 and order[:-2] == list(range(len(order) - 2))
        return _PendingCopy(OpCost(name, "data_movement", 0.0, 0, n_in, n_out, True, tuple(order)), last_two)
    if (name == "expand" and n_out > n_in) or (name != "expand" and len(outs) >= 1 and _numel(outs[0]) < n_in):
        return _PendingCopy(OpCost(name, "data_movement", 0.0, 0, n_in, n_out, True))
    return None


def _permutation(name: str, args: Any, ndim: int) -> list[int]:
    """The order of the input's dimensions in the output of a permute, transpose or t of ``ndim`` dimensions."""
    if name == "permute":
        return [int(d) % ndim for d in args[1]]
    order = list(range(ndim))
    if name == "t":
        return order[::-1]
    a, b = int(args[1]) % ndim, int(args[2]) % ndim
    order[a], order[b] = order[b], order[a]
    return order


def trace_module(model: Any, resolution: int | tuple[int, int], name: str = "model") -> CostTrace:
    """Trace an ``nn.Module`` (ideally on the meta device) at batch 1 and return its per-op costs.

    Args:
        model: the module; it is moved to the meta device if it is not there.
        resolution: input size, an int for square inputs or (H, W).
        name: a label stored in the trace.
    """
    import torch  # deferred: heavy, and a warm cache needs no trace
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if any(p.device.type != "meta" for p in model.parameters()):
        model = model.to("meta")
    model.eval()
    recorder = _Recorder({id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}, flop_registry)

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            recorder.on_op(func, args, kwargs, out, flat_in, flat_out)
            return out

    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # trace the real matmuls, not the fused fast path
    try:
        x = torch.empty(1, 3, h, w, device="meta")
        recorder.track(x)
        with torch.no_grad(), _Mode():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    return CostTrace(model=name, resolution=h, torch_version=torch_version(),
                     params=sum(p.numel() for p in model.parameters()), peak_activation=recorder.peak,
                     input_elements=3 * h * w, ops=recorder.ops)


@lru_cache(maxsize=1)
def torch_version() -> str:
    """The installed torch version, read without importing torch."""
    return metadata.version("torch")


def _cache_path(arch: str, resolution: int):
    return cache_dir("cost", f"torch-{torch_version()}-v{_TRACE_SCHEMA}") / f"{arch}_{resolution}.json"


def cached_trace(arch: str, resolution: int) -> CostTrace | None:
    """Return the cached trace of ``arch`` at ``resolution``, or ``None``."""
    path = _cache_path(arch, resolution)
    if not path.exists():
        return None
    try:
        return CostTrace.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None


def is_cached(arch: str, resolution: int) -> bool:
    """Whether the trace of ``arch`` at ``resolution`` is cached (so that no tracing is needed)."""
    return _cache_path(arch, resolution).exists()


class TraceError(Exception):
    """A model that could not be traced (internal; select lists it with the reason)."""


def trace_architecture(name: str, resolution: int, build: Callable[[], Any]) -> CostTrace:
    """Return the cached trace of architecture ``name`` at ``resolution``, or trace ``build()`` and cache it.

    Raises:
        TraceError: the architecture cannot be built or run at that resolution.
    """
    hit = cached_trace(name, resolution)
    if hit is not None:
        return hit
    log.debug("tracing %s at %d px on the meta device", name, resolution)
    try:
        trace = trace_module(build(), resolution, name=name)
    except Exception as exc:  # the architecture rejects this input size, or an op has no meta kernel
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{name} at {resolution}px: {reason}") from exc
    atomic_write_json(_cache_path(name, resolution), trace.to_dict(), indent=None)
    return trace
