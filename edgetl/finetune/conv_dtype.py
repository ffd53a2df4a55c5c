"""Grouped convolutions that train faster in fp32 than in bf16 on this CPU: timed before training, run in fp32.

bf16 autocast lowers every convolution to bf16. oneDNN's bf16 kernels speed up dense convolutions, but the
backward-weights pass of its grouped and depthwise convolutions can be several times slower in bf16 than in
fp32. On a 2-core EPYC with AVX-512 BF16, a 5x5 depthwise convolution over 1152 channels at 5x5 (batch 32)
took 34 ms for that pass in bf16 and 9 ms in fp32, and a whole bf16 training step of MobileNetV2 at 64 px took
1.9x the fp32 step. Which kernels are slow depends on the CPU and the oneDNN build, so nothing is assumed:

1. :func:`record_grouped_convs` runs the model once and records each trainable grouped convolution's call
   (the shapes and arguments ``conv2d`` sees, padding included).
2. :func:`time_conv` times each distinct call forward and backward at the run's batch size, in bf16 and in
   fp32 (the input cast up, as it arrives in bf16), side by side.
3. :func:`choose_fp32_convs` picks those at least :data:`FP32_MARGIN` faster in fp32. The timings are kept in
   a timing cache (``<cache>/conv_dtype/timings.json``, keyed by the machine's fingerprint, torch's version,
   the oneDNN ISA cap, the threads, the batch and the call), so the next run on this machine makes the same
   choice and computes the same numbers for the same seed, as TensorRT's timing cache does for its tactics.
4. :class:`Fp32Convs`, entered with autocast around each training step's forward, runs those in fp32 with
   autocast off. Their backward follows the forward's dtype.

Forward-only passes (evaluation, feature caching, a frozen trunk's convolutions) keep bf16, whose forward
kernels are the faster ones. Only the CPU with bf16 autocast is concerned; a resumed run keeps its choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from edgetl._io import atomic_write_json, cache_dir
from edgetl.device.machine import fingerprint
from edgetl.finetune.precision import TrainPrecision, onednn_isa_cap

log = logging.getLogger(__name__)

FP32_MARGIN = 0.9
"""A grouped convolution runs in fp32 when its fp32 forward + backward takes at most this share of bf16's."""
TIMING_ROUNDS = 3
"""Interleaved timed runs per dtype (after one warm-up run each); the fastest counts."""
_CONV2D = frozenset({torch.conv2d, F.conv2d})
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass(frozen=True)
class ConvCall:
    """What a ``conv2d`` call computes, batch aside: the input (C, H, W) as the call sees it and its arguments."""

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    bias: bool
    stride: Any
    padding: Any
    dilation: Any
    groups: int

    def describe(self) -> str:
        c, h, w = self.input_shape
        k = "x".join(str(d) for d in self.weight_shape[2:])
        return f"{self.weight_shape[0]}/{self.groups} groups, {k}, {c}x{h}x{w}, stride {self.stride}"


def _conv_args(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    given = {**dict(zip(_CONV_ARGS, args, strict=False)), **kwargs}
    return {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, **given}


class _Recorder(TorchFunctionMode):
    """Records the ``conv2d`` calls whose weight is one of ``weights`` (by identity)."""

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights, self.calls = weights, {}

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONV2D:
            a = _conv_args(args, kwargs)
            name = self.weights.get(id(a["weight"]))
            if name is not None:
                self.calls[name] = ConvCall(
                    tuple(a["input"].shape[1:]), tuple(a["weight"].shape), a["bias"] is not None,
                    _plain(a["stride"]), _plain(a["padding"]), _plain(a["dilation"]), int(a["groups"]))
        return func(*args, **kwargs)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


class Fp32Convs(TorchFunctionMode):
    """Runs the ``conv2d`` calls on ``weights`` in fp32 with autocast off (enter it inside the autocast context)."""

    def __init__(self, weights: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.ids = frozenset(id(w) for w in weights)

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONV2D and len(args) > 1 and id(args[1]) in self.ids:
            with torch.autocast(args[0].device.type, enabled=False):
                return func(args[0].float(), *args[1:], **kwargs)
        return func(*args, **kwargs)


def trainable_grouped_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The model's grouped (and depthwise) 2-D convolutions whose weights train, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.weight.requires_grad}


def record_grouped_convs(model: nn.Module, resolution: int, device: torch.device,
                         channels_last: bool) -> dict[str, ConvCall]:
    """Each trainable grouped convolution's call in one eval-mode forward of a ``resolution`` image."""
    convs = trainable_grouped_convs(model)
    if not convs:
        return {}
    x = torch.zeros(1, 3, resolution, resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    modes = {m: m.training for m in model.modules()}
    recorder = _Recorder({id(m.weight): name for name, m in convs.items()})
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return recorder.calls


def time_conv(call: ConvCall, batch: int, device: torch.device, rounds: int = TIMING_ROUNDS) -> tuple[float, float]:
    """The fastest forward + backward of ``call`` at ``batch`` (ms) in bf16 autocast and in fp32, interleaved.

    The input arrives in bf16 and needs its gradient, as inside a bf16 network; the fp32 run casts it up."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *call.input_shape, generator=gen).to(device, torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(call.weight_shape, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    b = torch.zeros(call.weight_shape[0], device=device, requires_grad=True) if call.bias else None
    args = (call.stride, call.padding, call.dilation, call.groups)

    def run(fp32: bool) -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not fp32):
            y = F.conv2d(x.float() if fp32 else x, w, b, *args)
        y.backward(torch.ones_like(y))
        x.grad = w.grad = None
        if b is not None:
            b.grad = None
        return (time.perf_counter() - start) * 1e3

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(rounds + 1):
        for fp32 in (False, True):
            t = run(fp32)
            if i:  # the first round warms up
                times[fp32].append(t)
    return min(times[False]), min(times[True])


def choose_fp32_convs(model: nn.Module, precision: TrainPrecision, resolution: int, batch: int,
                      device: torch.device) -> TrainPrecision:
    """``precision`` with the trainable grouped convolutions that train faster in fp32 here (see the module
    docstring); unchanged unless it is bf16 autocast on the CPU and the model has such convolutions."""
    if device.type != "cpu" or precision.autocast_dtype is not torch.bfloat16:
        return precision
    calls = record_grouped_convs(model, resolution, device, precision.channels_last)
    counts = Counter(calls.values())
    timings = cached_timings(counts, batch, device)
    fp32 = [name for name, call in calls.items() if timings[call][1] <= FP32_MARGIN * timings[call][0]]
    rows = [{"conv": call.describe(), "count": counts[call], "bf16_ms": round(bf16, 3), "fp32_ms": round(f32, 3),
             "fp32": f32 <= FP32_MARGIN * bf16} for call, (bf16, f32) in timings.items()]
    return with_fp32_convs(precision, fp32, len(calls), rows)


def with_fp32_convs(precision: TrainPrecision, names: Sequence[str], candidates: int,
                    timings: Sequence[dict[str, Any]] = (), kept: bool = False) -> TrainPrecision:
    """``precision`` running the convolutions ``names`` in fp32, its reason saying so."""
    if not candidates:
        return precision
    how = "kept from the run resumed" if kept else "timed faster in fp32 on this CPU, forward and backward"
    reason = f"{precision.reason}; {len(names)} of {candidates} trainable grouped convolutions in fp32 ({how})"
    return replace(precision, fp32_convs=tuple(names), conv_timings=tuple(timings), reason=reason)


def cached_timings(calls: Iterable[ConvCall], batch: int, device: torch.device) -> dict[ConvCall, tuple[float, float]]:
    """:func:`time_conv` of each call, read from the timing cache when this machine timed it before."""
    path = cache_dir("conv_dtype") / "timings.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    out, new = {}, 0
    where = {"machine": fingerprint(runtime="torch"), "onednn_cap": onednn_isa_cap(),
             "threads": torch.get_num_threads(), "batch": batch}
    for call in calls:
        key = _cache_key(where, call)
        hit = cache.get(key)
        if not (isinstance(hit, list) and len(hit) == 2 and all(isinstance(v, (int, float)) for v in hit)):
            hit, new = list(time_conv(call, batch, device)), new + 1
            cache[key] = hit
        out[call] = (float(hit[0]), float(hit[1]))
    if new:
        try:
            atomic_write_json(path, cache)
        except OSError as exc:  # a read-only cache costs the next run a re-timing, nothing else
            log.warning("could not save the convolution timings to %s: %s", path, exc)
    return out


def _cache_key(where: dict[str, Any], call: ConvCall) -> str:
    what = {**where, "call": repr(call)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]
