"""Device profiles: one YAML file per device, validated by a strict pydantic schema.

A profile gives what the latency and memory predictor needs to know about a device: its runtime and
precisions, dense peak compute per precision, memory size and bandwidth, per-op-class efficiency and
per-kernel overhead, plus published reference measurements. Every figure says where it comes from:
``source`` (an id of the profile's ``sources`` map, or a URL) or ``derived`` (how it was computed).

Profiles are looked up by name or alias in these folders, a later folder replacing an earlier
profile of the same name:

1. the built-in profiles shipped with edgetl;
2. :func:`user_profile_dir` (``$EDGETL_CONFIG_DIR/profiles`` or ``~/.config/edgetl/profiles``), where
   ``edgetl device calibrate`` saves;
3. the folders of ``$EDGETL_PROFILE_PATH`` (``os.pathsep``-separated; like ``PATH``, its first entry
   wins). The CLI's ``--profiles DIR`` prepends to it.

Parsed profiles are cached per search path and file state, so repeated look-ups cost a few ``stat``
calls. This module never imports torch.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import logging
import os
import platform
import re
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from edgetl._io import atomic_write_text
from edgetl.device.machine import cpu_model, fingerprint, host_name
from edgetl.errors import ProfileError, UnknownNameError, did_you_mean
from edgetl.options import DEFAULT_DEVICE_HELP as DEFAULT_DEVICE_HELP  # defined beside the --device option
from edgetl.options import PRECISIONS, Precision

log = logging.getLogger(__name__)

PROFILE_PATH_ENV = "EDGETL_PROFILE_PATH"
CONFIG_DIR_ENV = "EDGETL_CONFIG_DIR"
SCHEMA_VERSION = 1

# The wheel ships profiles/*.yaml as this package; a source checkout has them in <repo>/profiles.
_DATA_PACKAGE = "edgetl.profile_data"
_URL = re.compile(r"^https?://\S+$")

Family = Literal["jetson", "raspberry-pi", "x86", "custom"]
Runtime = Literal["tensorrt", "onnxruntime"]
ReferenceRuntime = Literal["tensorrt", "onnxruntime", "torch", "executorch", "tflite"]
Metric = Literal["mean", "p50", "p90", "min"]
Fraction = Annotated[float, Field(gt=0, le=1)]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
Text = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

    value: float = Field(gt=0)


class Overhead(_Provenance):
    """A non-negative cost (time or memory) with its provenance."""

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
    run costs beyond its kernels.
    """

    threads: int = Field(ge=1)
    profiler_us: float = Field(ge=0)
    stream_gbs: float = Field(ge=0)
    cache_mb: float = Field(ge=0)
    block: int = Field(default=1, ge=1)
    run_us: float = Field(default=0.0, ge=0)
    samples: list[list[str | float]] = Field(min_length=3)

    @field_validator("samples")
    @classmethod
    def _rows(cls, rows: list[list[str | float]]) -> list[list[str | float]]:
        from edgetl.device.kernel_model import FEATURES  # deferred: the kernel model is needed only to predict

        for i, row in enumerate(rows):
            kind = row[0] if row else None
            if kind not in FEATURES:
                raise ValueError(f"samples[{i}]: unknown kernel kind {kind!r}; one of {', '.join(FEATURES)}")
            if len(row) != len(FEATURES[kind]) + 2 or not all(
                    isinstance(v, (int, float)) and v > 0 for v in row[1:]):
                raise ValueError(f"samples[{i}]: a {kind} row is [{kind}, {', '.join(FEATURES[kind])}, microseconds], "
                                 "all positive")
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

    Load one with :func:`load_profile`. The schema rejects unknown keys; see ``profiles/*.yaml``.
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

    def to_yaml(self) -> str:
        """Render the profile as YAML in the layout of the built-in files; it loads back unchanged."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(
            _for_yaml(data),
            Dumper=_Dumper,
            sort_keys=False,
            allow_unicode=True,
            width=100_000,
            default_flow_style=False,
        )


def _isa_key(flag: str) -> str:
    return re.sub(r"[^a-z0-9]", "", flag.lower())


# --- YAML reading and writing -------------------------------------------------------------------

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """Dumper that writes figures, references and short lists in flow style, like the built-in files."""


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class _Flow(dict):
    pass


class _FlowList(list):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping(_MAP_TAG, v, flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence(_SEQ_TAG, v, flow_style=True))


def _for_yaml(obj: Any, key: str = "") -> Any:
    """Mark leaf mappings and scalar lists for flow style; write integral floats as ints."""
    if isinstance(obj, dict):
        out = {k: _for_yaml(v, k) for k, v in obj.items()}
        leaf = all(not isinstance(v, dict) for v in obj.values())
        if leaf and key not in ("efficiency", "sources", "calibrated", "kernels", ""):
            # a figure reads best as {value: ..., source: ...}: provenance last
            last = {k: out.pop(k) for k in ("source", "derived") if k in out}
            return _Flow({**out, **last})
        return out
    if isinstance(obj, list):
        items = [_for_yaml(v, key) for v in obj]
        return _FlowList(items) if all(not isinstance(v, (dict, list)) for v in obj) else items
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 1e15:
        return int(obj)
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a UTF-8 text file; save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile ({exc.strerror}); check the path") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        if exc.problem and exc.context and exc.context_mark is not None:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        fix = "remove one of them" if problem.startswith("duplicate key") else "fix the syntax there"
        raise ProfileError(f"{path}{where}: invalid YAML: {problem}; {fix}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ProfileError(
            f"{path}: expected a mapping of profile fields (name:, family:, runtime:, ...), got {got}; "
            f"start from a built-in profile (see `edgetl devices`)"
        )
    return data


def _validate(data: dict[str, Any], path: Path) -> DeviceProfile:
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{path}: {format_validation_error(exc)}") from None
    if profile.name != path.stem:
        raise ProfileError(
            f"{path}: name: '{profile.name}' does not match the file name; "
            f"set `name: {path.stem}` or rename the file to {profile.name}{path.suffix}"
        )
    profile._path = path
    return profile


def read_profile_file(path: str | os.PathLike[str]) -> DeviceProfile:
    """Parse and validate one profile file (no search path, no cache).

    Raises:
        ProfileError: a one-line message naming the file, the field and the fix.
    """
    path = Path(path).expanduser()
    return _validate(_read_yaml(path), path)


# --- Error messages -----------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _type_at(loc: tuple[Any, ...]) -> Any:
    """The annotation of the field at ``loc`` in :class:`DeviceProfile` (``None`` if unknown)."""
    tp: Any = DeviceProfile
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif origin is list:
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _unwrap(tp)


def _example(tp: Any, parent: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, _Provenance) and "value" in tp.model_fields:
        return "{value: ..., source: ...}"
    if parent is Efficiency:
        return "0.3  # fraction of peak, in (0, 1]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "{" + ", ".join(f"{k}: ..." for k, f in tp.model_fields.items() if f.is_required()) + "}"
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return f"{choices[0]}  # one of {', '.join(map(str, choices))}"
    if typing.get_origin(tp) is list:
        return "[...]"
    if typing.get_origin(tp) is dict:
        return "{...}"
    return "..."


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    path = _dotted(loc)
    if kind == "missing":
        example = _example(_type_at(loc), _unwrap(_type_at(loc[:-1])))
        return f"{path}: field required; add `{loc[-1]}: {example}`"
    if kind == "extra_forbidden":
        parent = _unwrap(_type_at(loc[:-1]))
        is_model = isinstance(parent, type) and issubclass(parent, BaseModel)
        allowed = list(parent.model_fields) if is_model else []
        hint = did_you_mean(str(loc[-1]), allowed, n=1)
        maybe = f"did you mean '{hint[0]}'? " if hint else ""
        return f"{path}: unknown key; {maybe}remove or rename it (allowed here: {', '.join(allowed)})"
    if kind == "value_error" and not loc:
        return msg
    if kind == "string_pattern_mismatch":
        return (
            f"{path}: {error.get('input')!r} is not a valid name; use lowercase letters, digits, '-', '.' "
            f"and '_', e.g. 'my-jetson'"
        )
    if msg and msg[0].isupper() and not msg[:2].isupper():
        msg = msg[0].lower() + msg[1:]
    given = error.get("input")
    if "[key]" in loc:
        msg = msg.replace("input should", "key should")
    elif isinstance(given, (int, float, str, bool)) and kind != "value_error":
        msg = f"{msg} (got {given!r})"
    return f"{path}: {msg}"


def format_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """Turn a pydantic error into one line: ``field.path: what is wrong; how to fix it``."""
    # an unknown key usually explains a "field required" next to it (a typo), so it goes first
    errors = sorted(exc.errors(include_url=False), key=lambda e: e.get("type") != "extra_forbidden")
    text = " | ".join(_describe(e) for e in errors[:limit])
    if len(errors) > limit:
        text += f" (and {len(errors) - limit} more)"
    return " ".join(text.split())


# --- Search path and registry -------------------------------------------------------------------


def builtin_profile_dir() -> Path:
    """The folder of the profiles shipped with edgetl."""
    # A source checkout's own profiles/ first: an editable install's finder may point edgetl.profile_data at
    # another checkout (a git worktree run with PYTHONPATH), and the code and its profiles must match.
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if (checkout / "__init__.py").is_file() and (Path(__file__).resolve().parents[2] / "pyproject.toml").is_file():
        return checkout
    try:
        spec = importlib.util.find_spec(_DATA_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        root = importlib.resources.files(_DATA_PACKAGE)
        if isinstance(root, Path):
            return root
    return Path(__file__).resolve().parents[2] / "profiles"


def user_profile_dir() -> Path:
    """The user's profile folder: ``$EDGETL_CONFIG_DIR/profiles`` or ``~/.config/edgetl/profiles``."""
    root = os.environ.get(CONFIG_DIR_ENV)
    if root:
        return Path(root).expanduser() / "profiles"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "edgetl" / "profiles"


def profile_search_path() -> list[Path]:
    """The profile folders, lowest priority first: a later folder's profile replaces an earlier one.

    Order: built-in, :func:`user_profile_dir`, then ``$EDGETL_PROFILE_PATH`` (whose first entry wins,
    as in ``PATH``, so it comes last here).
    """
    entries = os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep)
    extra = [Path(p).expanduser() for p in entries if p.strip()]
    return [builtin_profile_dir(), user_profile_dir(), *reversed(extra)]


_Snapshot = tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]


def _snapshot(folders: list[Path]) -> _Snapshot:
    """The YAML files of each folder with their mtime and size: the cache key of the registry."""
    out = []
    for folder in folders:
        files: list[tuple[str, int, int]] = []
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.endswith(".yaml") and not entry.name.startswith(".") and entry.is_file():
                    st = entry.stat()
                    files.append((entry.name, st.st_mtime_ns, st.st_size))
        out.append((str(folder), tuple(sorted(files))))
    return tuple(out)


@dataclass(frozen=True)
class _Registry:
    profiles: dict[str, DeviceProfile]
    aliases: dict[str, str]
    broken: dict[str, str]
    """File stem -> the error of a profile file that could not be read (skipped with a warning)."""


@lru_cache(maxsize=16)
def _registry(snapshot: _Snapshot) -> _Registry:
    profiles: dict[str, DeviceProfile] = {}
    broken: dict[str, str] = {}
    builtin, user = str(builtin_profile_dir()), str(user_profile_dir())
    for folder, files in snapshot:
        if not Path(folder).is_dir():
            if folder == builtin:
                log.warning("the built-in device profiles are missing (%s); reinstall edgetl", folder)
            elif folder != user:
                log.warning("profile folder %s does not exist (%s, --profiles)", folder, PROFILE_PATH_ENV)
            continue
        for name, _, _ in files:
            try:
                profile = read_profile_file(Path(folder) / name)
            except ProfileError as exc:  # one broken file must not make every device unusable
                log.warning("skipping device profile %s", exc)
                broken[Path(name).stem.lower()] = str(exc)
                continue
            if profile.name in profiles:
                previous = profiles[profile.name].path
                log.debug("profile %s: %s overrides %s", profile.name, profile.path, previous)
            profiles[profile.name] = profile
    aliases: dict[str, str] = {}
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        for alias in profile.aliases:
            other = aliases.get(alias) or (alias if alias in profiles else None)
            if other is not None:
                raise ProfileError(
                    f"alias '{alias}' of {profile.path} is already used by {profiles[other].path}; "
                    f"remove it from one of the two files"
                )
            aliases[alias] = profile.name
    log.debug("loaded %d device profiles from %d folders", len(profiles), len(snapshot))
    return _Registry(profiles, aliases, broken)


def _current() -> _Registry:
    return _registry(_snapshot(profile_search_path()))


def _copy(profile: DeviceProfile) -> DeviceProfile:
    # Callers may tune a profile (fitting efficiencies); never let that leak into the cache.
    return copy.deepcopy(profile)


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a device profile by name (``jetson-orin-nano``), alias (``jetson``, ``rpi``, ``x86``) or path.

    Raises:
        UnknownNameError: no profile has that name or alias (the message suggests close names).
        ProfileError: a profile file is malformed (the message names the file and the field).
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(
                f"{path}: no such profile file; check the path, or give a device name (see `edgetl devices`)"
            )
        return read_profile_file(path)
    registry = _current()
    key = text.strip().lower()
    if key in registry.broken:  # the user's file of that name is broken: do not fall back to another one
        raise ProfileError(registry.broken[key])
    name = key if key in registry.profiles else registry.aliases.get(key)
    if name is None:
        choices = sorted([*registry.profiles, *registry.aliases])
        raise UnknownNameError("device", text, choices, hint="see `edgetl devices`")
    return _copy(registry.profiles[name])


def family_device() -> str:
    """The built-in profile closest to this machine's CPU family (x86-64: x86-avx2; Arm: raspberry-pi-5)."""
    machine = platform.machine().lower()
    return "raspberry-pi-5" if machine in ("aarch64", "arm64", "armv8l") else "x86-avx2"


def default_device() -> str:
    """The device every stage targets when none is named, one rule for export, select and validate: this
    machine's calibrated profile when there is one (``edgetl device calibrate``), where a budget is judged
    on a measurement, else :func:`family_device`."""
    mine = [p.name for p in list_profiles() if p.is_this_machine()]
    return mine[0] if mine else family_device()


def list_profiles() -> list[DeviceProfile]:
    """All profiles on the search path (later folders replacing earlier ones), sorted by name."""
    registry = _current()
    return [_copy(registry.profiles[n]) for n in sorted(registry.profiles)]


def profile_names(include_aliases: bool = True) -> list[str]:
    """The names (and aliases) that :func:`load_profile` accepts, sorted."""
    registry = _current()
    names = [*registry.profiles, *(registry.aliases if include_aliases else ())]
    return sorted(names)


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` as YAML atomically and return the file path.

    ``path`` is a ``.yaml`` file whose stem is the profile's name, or a folder (the file is then
    ``<folder>/<name>.yaml``). The text is parsed back and compared before anything is written.

    Raises:
        ProfileError: the file name does not match the profile name, or the profile does not round-trip.
    """
    path = Path(path).expanduser()
    if path.is_dir() or not path.suffix:
        path = path / f"{profile.name}.yaml"
    if path.stem != profile.name:
        raise ProfileError(
            f"{path}: the file name must be the profile name; "
            f"save it as {path.with_name(profile.name + '.yaml')}"
        )
    text = profile.to_yaml()
    try:
        again = _validate(yaml.load(text, Loader=_Loader), path)
    except ProfileError as exc:
        raise ProfileError(f"profile {profile.name} does not survive a YAML round trip: {exc}") from None
    if again.model_dump() != profile.model_dump():
        raise ProfileError(f"profile {profile.name} changes in a YAML round trip; this is an edgetl bug")
    atomic_write_text(path, text)
    log.debug("saved profile %s to %s", profile.name, path)
    return path
