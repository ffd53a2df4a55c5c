"""The device profile schema: strict pydantic models of one device's figures, each with its provenance.

A profile gives what the latency and memory predictor needs to know about a device: its runtime and
precisions, dense peak compute per precision, memory size and bandwidth, per-op-class efficiency and
per-kernel overhead, plus published reference measurements. Every figure says where it comes from:
``source`` (an id of the profile's ``sources`` map, or a URL) or ``derived`` (how it was computed).

Reading, writing and finding profile files is :mod:`edgetl.device.profiles`. This module never imports torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from edgetl.device.machine import cpu_model, fingerprint, host_name
from edgetl.errors import ProfileError, did_you_mean
from edgetl.options import PRECISIONS, NumbersNotBooleans, Precision

SCHEMA_VERSION = 1

_URL = re.compile(r"^https?://\S+$")

Family = Literal["jetson", "raspberry-pi", "x86", "custom"]
Runtime = Literal["tensorrt", "onnxruntime"]
ReferenceRuntime = Literal["tensorrt", "onnxruntime", "torch", "executorch", "tflite"]
Metric = Literal["mean", "p50", "p90", "min"]
Fraction = Annotated[float, Field(gt=0, le=1, examples=["0.3  # fraction of peak, in (0, 1]"])]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$",
                            description="a name: lowercase letters, digits, '-', '.' and '_', e.g. 'my-jetson'")]
Text = Annotated[str, Field(min_length=1)]


class _Strict(NumbersNotBooleans):
    """Unknown keys, NaN, infinity (``.inf`` compute would predict no latency at all) and booleans for numbers
    are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Provenance(_Strict):
    """Where a figure comes from: exactly one of ``source`` or ``derived``."""

    source: Text | None = None
    derived: Text | None = None

    @model_validator(mode="after")
    def _exactly_one_provenance(self) -> _Provenance:
        if (self.source is None) == (self.derived is None):
            raise ValueError(
                "give exactly one of `source:` (an id from `sources:` or a URL, for a published figure) "
                "or `derived:` (how the figure was computed)"
            )
        return self


class Figure(_Provenance):
    """A positive number with its provenance."""

    EXAMPLE: ClassVar[str] = "{value: ..., source: ...}"

    value: float = Field(gt=0)


class Overhead(_Provenance):
    """A non-negative cost (time or memory) with its provenance."""

    EXAMPLE: ClassVar[str] = "{value: ..., source: ...}"

    value: float = Field(ge=0)


class RssFit(_Provenance):
    """The runtime's memory as a function of the model, fitted to measured peak RSS (MB = 1e6 bytes)::

        memory = conv_weights_factor x convolution weights + weights_factor x the other weights
                 + activations_factor x peak live activations + constant_mb

    The weight factors cover the runtime's copies of the weights (the file read, the initializers and their
    pre-packed layouts: ONNX Runtime re-lays convolution weights out, so they cost more than FC/matmul ones);
    ``activations_factor`` the activation arena; ``constant_mb`` the session.
    """

    conv_weights_factor: float = Field(ge=0)
    weights_factor: float = Field(ge=0)
    activations_factor: float = Field(ge=0)
    constant_mb: float = Field(ge=0)


class Memory(_Strict):
    """Memory of the device (MB = 2**20 bytes for RAM sizes, GB/s = 1e9 bytes per second)."""

    ram_mb: Figure
    bandwidth_gbs: Figure
    model_budget_mb: Figure
    runtime_overhead_mb: Overhead
    rss_fit: RssFit | None = None

    @model_validator(mode="after")
    def _budget_fits(self) -> Memory:
        if self.model_budget_mb.value > self.ram_mb.value:
            raise ValueError(
                f"model_budget_mb ({self.model_budget_mb.value:g}) is larger than ram_mb "
                f"({self.ram_mb.value:g}); lower the budget"
            )
        return self


class Efficiency(_Provenance):
    """Fraction of peak compute reached per op class, and fraction of peak bandwidth reached."""

    conv: Fraction
    depthwise: Fraction
    matmul: Fraction
    attention: Fraction
    norm: Fraction
    elementwise: Fraction
    pool: Fraction
    data_movement: Fraction
    bandwidth: Fraction


class KernelTimings(_Provenance):
    """The device's kernels timed one by one (``edgetl device calibrate``), from which latency is predicted as the
    sum over a model's kernels (:mod:`edgetl.device.kernel_model`).

    Each sample row is ``[kind, feature..., microseconds]`` with the features of
    :data:`edgetl.device.kernel_model.FEATURES`.
    ``profiler_us`` is what the profiler added to each kernel it timed (already taken off the samples),
    ``stream_gbs`` the rate at which a kernel streams weights from DRAM and ``cache_mb`` the last-level cache:
    a model whose weights exceed it reads them from DRAM on every run. ``block`` is the channel block of the
    runtime's blocked convolutions (:func:`edgetl.device.kernel_model.blocked_channels`), ``run_us`` what a
    run costs beyond its kernels, and ``run_scale`` a whole run's fastest time over the sum of its kernels', at
    a mean kernel time in the middle of ``run_kernel_us`` and moving by ``run_slope`` per e-fold of the mean kernel
    time within that range (:meth:`edgetl.device.kernel_model.KernelModel.run_factor`).
    """

    threads: int = Field(ge=1)
    profiler_us: float = Field(ge=0)
    stream_gbs: float = Field(ge=0)
    cache_mb: float = Field(ge=0)
    block: int = Field(default=1, ge=1)
    run_us: float = Field(default=0.0, ge=0)
    run_scale: float = Field(default=1.0, gt=0)
    run_slope: float = 0.0
    run_kernel_us: tuple[float, float] = (1.0, 1.0)
    samples: list[list[str | float]] = Field(min_length=3)

    @field_validator("run_kernel_us")
    @classmethod
    def _span(cls, span: tuple[float, float]) -> tuple[float, float]:
        if not 0 < span[0] <= span[1] < math.inf:
            raise ValueError(f"run_kernel_us is [shortest, longest] mean kernel time, 0 < shortest <= longest; got "
                             f"{list(span)}")
        return span

    @field_validator("samples")
    @classmethod
    def _rows(cls, rows: list[list[str | float]]) -> list[list[str | float]]:
        from edgetl.device.kernel_model import FEATURES  # deferred: the kernel model is needed only to predict

        for i, row in enumerate(rows):
            kind = row[0] if row else None
            if kind not in FEATURES:
                raise ValueError(f"samples[{i}]: unknown kernel kind {kind!r}; one of {', '.join(FEATURES)}")
            if len(row) != len(FEATURES[kind]) + 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in row[1:]):
                raise ValueError(f"samples[{i}]: a {kind} row is [{kind}, {', '.join(FEATURES[kind])}, microseconds], "
                                 "all positive and finite")
        return rows


class CPU(_Provenance):
    """The host CPU: core and thread counts, instruction-set extensions (``/proc/cpuinfo`` spelling)."""

    cores: int = Field(gt=0)
    threads: int = Field(gt=0)
    isa: list[Text] = Field(default_factory=list)
    model: Text | None = None
    ghz: float | None = Field(default=None, gt=0)

    @field_validator("isa")
    @classmethod
    def _lower_isa(cls, value: list[str]) -> list[str]:
        return [flag.strip().lower() for flag in value]

    @model_validator(mode="after")
    def _threads_cover_cores(self) -> CPU:
        if self.threads < self.cores:
            raise ValueError(f"threads ({self.threads}) must be at least cores ({self.cores})")
        return self


class Reference(_Provenance):
    """A published (or measured) latency of one model on the device.

    ``runtime`` is required: a prediction is checked only against references of the profile's own
    runtime. ``used_for_fit`` marks a reference the profile's efficiencies were derived (fitted) from; it
    is then no check of the prediction, and the tests leave it out.
    """

    model: Text
    precision: Precision
    batch: int = Field(default=1, gt=0)
    resolution: int = Field(default=224, gt=0)
    latency_ms: float = Field(gt=0)
    runtime: ReferenceRuntime
    metric: Metric
    used_for_fit: bool = False
    note: Text | None = None

    @field_validator("runtime", mode="before")
    @classmethod
    def _pytorch_is_torch(cls, value: Any) -> Any:
        return "torch" if isinstance(value, str) and value.lower() == "pytorch" else value


class DeviceProfile(_Strict):
    """A device: runtime, precisions, roofline figures, efficiencies and reference measurements.

    Load one with :func:`edgetl.device.profiles.load_profile`. The schema rejects unknown keys; see ``profiles/*.yaml``.
    """

    name: Slug
    version: int = Field(default=SCHEMA_VERSION, ge=1)
    family: Family
    aliases: list[Slug] = Field(default_factory=list)
    description: str = ""
    sources: dict[str, Text] = Field(default_factory=dict)
    runtime: Runtime
    precisions: list[Precision] = Field(min_length=1)
    compute: dict[Precision, Figure]
    memory: Memory
    efficiency: Efficiency
    kernel_overhead_us: Overhead
    int8_speedup: Figure | None = None
    """INT8 over FP32 speed-up measured on the device (``edgetl device calibrate``); it replaces the one the ISA
    implies."""
    kernels: KernelTimings | None = None
    """Kernel-level timings measured on the device; when present they predict ONNX Runtime latency."""
    cpu: CPU | None = None
    realtime_fps: Figure | None = None
    """The frame rate a model must keep up with on this device, one frame per image: ``select``'s default latency
    budget (without it: :data:`edgetl.options.REALTIME_FPS`)."""
    calibrated: dict[str, Any] | None = None
    reference: list[Reference] = Field(default_factory=list)

    _path: Path | None = PrivateAttr(default=None)
    _kernel_model: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        for label, items in (("precisions", self.precisions), ("aliases", self.aliases)):
            seen = [x for i, x in enumerate(items) if x in items[:i]]
            if seen:
                raise ValueError(f"{label}: '{seen[0]}' is listed twice; remove one")
        if self.name in self.aliases:
            raise ValueError(f"aliases: '{self.name}' is the profile's own name; remove it")
        for p in self.precisions:
            if p not in self.compute:
                raise ValueError(
                    f"compute.{p}: missing, but {p} is in `precisions`; add "
                    f"`{p}: {{value: ..., source: ...}}` under `compute:` or drop {p} from `precisions`"
                )
        for p in self.compute:
            if p not in self.precisions:
                raise ValueError(
                    f"compute.{p}: {p} is not in `precisions` ({', '.join(self.precisions)}); "
                    f"add it there or remove this entry"
                )
        for i, ref in enumerate(self.reference):
            if ref.precision not in self.precisions:
                raise ValueError(
                    f"reference[{i}].precision: {ref.precision} is not in `precisions` "
                    f"({', '.join(self.precisions)}); fix the entry or the precisions"
                )
        for where, fig in self._provenances():
            if fig.source is not None and fig.source not in self.sources and not _URL.match(fig.source):
                hint = did_you_mean(fig.source, self.sources)
                maybe = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ValueError(
                    f"{where}.source: unknown source id '{fig.source}'{maybe} "
                    f"(add it under `sources:` or give a URL)"
                )
        return self

    def _provenances(self) -> list[tuple[str, _Provenance]]:
        items: list[tuple[str, _Provenance]] = [(f"compute.{k}", v) for k, v in self.compute.items()]
        items += [(f"memory.{k}", getattr(self.memory, k)) for k in Memory.model_fields
                  if getattr(self.memory, k) is not None]
        items += [("efficiency", self.efficiency), ("kernel_overhead_us", self.kernel_overhead_us)]
        if self.int8_speedup is not None:
            items.append(("int8_speedup", self.int8_speedup))
        if self.kernels is not None:
            items.append(("kernels", self.kernels))
        if self.cpu is not None:
            items.append(("cpu", self.cpu))
        if self.realtime_fps is not None:
            items.append(("realtime_fps", self.realtime_fps))
        items += [(f"reference[{i}]", r) for i, r in enumerate(self.reference)]
        return items

    @property
    def path(self) -> Path | None:
        """The YAML file the profile was loaded from (``None`` for a profile built in memory)."""
        return self._path

    def kernel_model(self) -> Any:
        """The :class:`~edgetl.device.kernel_model.KernelModel` fitted to ``kernels`` (built once), or None."""
        if self.kernels is None:
            return None
        if self._kernel_model is None:
            from edgetl.device.kernel_model import KernelModel  # deferred: numpy and scipy

            self._kernel_model = KernelModel.from_dict(self.kernels.model_dump())
        return self._kernel_model

    def supports(self, precision: str) -> bool:
        """Return whether the device's runtime can run ``precision``."""
        return precision.strip().lower() in self.precisions

    def check_precision(self, precision: str) -> str:
        """Return ``precision`` normalised (``"FP16"`` -> ``"fp16"``) if the device supports it.

        Raises:
            ProfileError: the precision is unknown or the device cannot run it.
        """
        p = precision.strip().lower()
        supported = ", ".join(self.precisions)
        if p not in PRECISIONS:
            raise ProfileError(
                f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)} "
                f"({self.name} supports {supported})"
            )
        if p not in self.precisions:
            raise ProfileError(f"{self.name} does not support {p}; supported: {supported}")
        return p

    def peak_gflops(self, precision: str) -> float:
        """Dense peak compute at ``precision`` in GFLOP/s (GOP/s for int8)."""
        return float(self.compute[self.check_precision(precision)].value)  # type: ignore[index]

    def has_isa(self, flag: str) -> bool:
        """Return whether the CPU lists the ISA extension ``flag`` (``avx512_vnni`` = ``avx512-vnni``)."""
        if self.cpu is None:
            return False
        want = _isa_key(flag)
        return any(_isa_key(f) == want for f in self.cpu.isa)

    def is_this_machine(self) -> bool:
        """Whether the profile was calibrated on this machine.

        A profile that records a machine fingerprint (CPU model, ISA flags, cores, the version of the
        profile's runtime, see :func:`edgetl.device.machine.fingerprint`) is this machine's when the fingerprint
        matches; an older one when its host name and CPU model do.
        """
        cal = self.calibrated
        if not cal:
            return False
        if "fingerprint" in cal:
            return cal["fingerprint"] == fingerprint(runtime=self.runtime)
        return cal.get("host") == host_name() and cal.get("cpu") == cpu_model()

    def references(self, runtime: str | None = None, precision: str | None = None) -> list[Reference]:
        """The reference measurements, optionally only those of one runtime and/or precision."""
        return [
            r
            for r in self.reference
            if (runtime is None or r.runtime == runtime) and (precision is None or r.precision == precision)
        ]

    def held_out_references(self) -> list[Reference]:
        """The references a prediction can be checked against: measured with the profile's own runtime
        (ONNX Runtime against ONNX Runtime, TensorRT against TensorRT) and not used to fit the profile."""
        return [r for r in self.reference if r.runtime == self.runtime and not r.used_for_fit]


def _isa_key(flag: str) -> str:
    return re.sub(r"[^a-z0-9]", "", flag.lower())
