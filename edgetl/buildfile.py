"""The build file of ``edgetl build``: its schema, loading, and one-line error messages.

Every section is a pydantic model that rejects unknown keys; an error names the file, the field and
the fix (``pipeline.yaml: finetune.epoch: unknown key; did you mean 'epochs'?``). Relative paths
resolve against the build file's folder. See :mod:`edgetl.pipeline` for what a build does with it.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetl.errors import ConfigError, EdgetlError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constraints(_Strict):
    """What the selected model must meet on the device (``None``: no limit)."""

    max_latency_ms: float | None = Field(None, gt=0, description="predicted latency at batch 1")
    max_memory_mb: float | None = Field(None, gt=0, description="predicted memory [default: the profile's budget]")
    max_size_mb: float | None = Field(None, gt=0, description="file size at the precision")
    min_accuracy: float | None = Field(None, ge=0, le=100, description="ImageNet top-1 in percent")


class SelectOptions(_Strict):
    """How ``model: auto`` ranks the catalog (see ``edgetl select``)."""

    models: str | None = Field(None, description="glob over the catalog, e.g. 'mobilenet*'")
    all_weights: bool = Field(False, description="rank every weights tag, not only each model's DEFAULT")
    precision: Literal["fp32", "fp16", "int8"] | None = Field(
        None, description="precision of the prediction [default: export.precision, else the device's default]")
    top: int = Field(10, ge=1, description="rows of the selection table in the report")


class FinetuneOptions(_Strict):
    """Fine-tuning options (see ``edgetl finetune``)."""

    weights: str = Field("imagenet", description="imagenet, none, or a state_dict PATH")
    strategy: Literal["auto", "linear", "partial", "full"] = "auto"
    unfreeze: int | None = Field(None, ge=0)
    domain: Literal["auto", "similar", "different"] = "auto"
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    layer_decay: float = Field(0.7, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(32, ge=1)
    resolution: int | None = Field(None, ge=16, le=4096)
    val_split: float = Field(0.2, ge=0, lt=1)
    test_split: float = Field(0.0, ge=0, lt=1)
    augment: Literal["none", "light", "strong"] | None = None
    balance: bool = False
    patience: int | None = Field(5, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train (not the target device)")
    workers: int = Field(0, ge=0)
    on_bad_image: Literal["skip", "error"] = "skip"


class CalibrationOptions(_Strict):
    """INT8 calibration."""

    data: Path | None = Field(None, description="images to calibrate on [default: the run's training images]")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    size: int = Field(200, ge=1, description="calibration images (a stratified sample)")


class ExportOptions(_Strict):
    """Export options (see ``edgetl export``)."""

    precision: Literal["fp32", "fp16", "int8", "auto"] = "auto"
    calibration: CalibrationOptions = CalibrationOptions()
    int8_mode: Literal["auto", "static", "dynamic"] = "auto"
    opset: int = Field(17, ge=7, le=25)
    simplify: bool = True
    tensorrt: bool = Field(False, description="build model.engine here: only on the device itself")
    c_header: bool = Field(False, description="also write model_data.h")
    max_accuracy_drop: float = Field(1.0, ge=0, description="top-1 points lost to quantization, at most")
    rounds: int = Field(30, ge=1, description="interleaved timing rounds per precision candidate")
    threads: int | None = Field(None, ge=1)


class ValidateOptions(_Strict):
    """The validation budget (see ``edgetl validate``)."""

    max_latency_ms: float | None = Field(None, gt=0, description="[default: constraints.max_latency_ms]")
    max_memory_mb: float | None = Field(
        None, gt=0, description="[default: constraints.max_memory_mb, else the profile's model memory budget]")
    budget_metric: Literal["min", "p50", "p90", "p99"] = "p50"
    data: Path | None = Field(None, description="class folders to measure top-1 on [default: DATA/test if present]")
    iterations: int = Field(100, ge=1)
    warmup: int = Field(10, ge=0)
    threads: int | None = Field(None, ge=1)


class BuildConfig(_Strict):
    """A build file: the device and its constraints, the model, the data, and each stage's options."""

    device: str = Field(description="target device profile: a name, an alias or a YAML path")
    constraints: Constraints = Constraints()
    model: str = Field("auto", description="a catalog name, or auto: select's most accurate model that fits")
    data: Path = Field(description="class folders, a folder with train/ and val/, or a CSV of path,label")
    weights_dir: Path | None = Field(None, description="offline torchvision weights [default: $EDGETL_WEIGHTS_DIR]")
    data_fingerprint: Literal["stat", "content"] = "stat"
    select: SelectOptions = SelectOptions()
    finetune: FinetuneOptions = FinetuneOptions()
    export: ExportOptions = ExportOptions()
    validate_: ValidateOptions = Field(ValidateOptions(), alias="validate")
    out: Path = Field(Path("build"), description="output folder")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("device", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> BuildConfig:
        if self.select.precision and self.export.precision not in ("auto", self.select.precision):
            raise ValueError(
                f"select.precision is {self.select.precision} but export.precision is {self.export.precision}; "
                "drop select.precision (it follows export.precision) or make them equal"
            )
        return self

    def resolve_paths(self, base: str | os.PathLike[str]) -> BuildConfig:
        """Return a copy with every relative path made absolute against ``base`` (the build file's folder)."""
        base = Path(base).expanduser().resolve()

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        weights = self.finetune.weights
        if weights.lower() not in ("imagenet", "none"):
            weights = str(fix(Path(weights)))
        device = self.device
        if device.lower().endswith((".yaml", ".yml")) or "/" in device or os.sep in device:
            device = str(fix(Path(device)))
        return self.model_copy(update={
            "device": device,
            "data": fix(self.data),
            "weights_dir": fix(self.weights_dir),
            "out": fix(self.out),
            "finetune": self.finetune.model_copy(update={"weights": weights}),
            "export": self.export.model_copy(update={
                "calibration": self.export.calibration.model_copy(update={"data": fix(self.export.calibration.data)}),
            }),
            "validate_": self.validate_.model_copy(update={"data": fix(self.validate_.data)}),
        })

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-friendly data, with the YAML key names."""
        return self.model_dump(mode="json", by_alias=True)


def _field_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (by YAML key names)."""
    model: Any = BuildConfig
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        f = fields.get(part)
        if f is None:
            return None
        model = _unwrap(f.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in error.get("loc", ()))
    where = ".".join(loc) or "(top level)"
    kind = error.get("type", "")
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    given = error.get("input")
    if kind == "extra_forbidden":
        parent = _field_model(loc[:-1]) or BuildConfig
        allowed = _keys_of(parent)
        hint = did_you_mean(loc[-1], allowed, n=1)
        maybe = f"did you mean '{hint[0]}'? " if hint else ""
        return f"{where}: unknown key; {maybe}remove or rename it (allowed here: {', '.join(allowed)})"
    if kind == "missing":
        example = {"device": "x86  # see `edgetl devices`", "data": "path/to/images"}.get(loc[-1], "...")
        return f"{where}: required; add `{loc[-1]}: {example}`"
    if kind == "model_type" or kind == "dict_type":
        parent = _field_model(loc)
        keys = ", ".join(_keys_of(parent)) if parent else "..."
        return f"{where}: expected a mapping ({keys}), got {given!r}"
    if msg[:1].isupper() and not msg[:2].isupper():
        msg = msg[0].lower() + msg[1:]
    if isinstance(given, (int, float, str, bool)) and kind != "value_error":
        msg = f"{msg} (got {given!r})"
    return f"{where}: {msg}" if loc else msg


def format_config_error(exc: ValidationError, source: str, limit: int = 3) -> str:
    """One line: ``file: field: what is wrong; how to fix it`` (unknown keys first: they explain the rest)."""
    errors = sorted(exc.errors(include_url=False), key=lambda e: e.get("type") != "extra_forbidden")
    text = " | ".join(_describe(e) for e in errors[:limit])
    if len(errors) > limit:
        text += f" (and {len(errors) - limit} more)"
    return f"{source}: " + " ".join(text.split())


def load_build_config(path: str | os.PathLike[str]) -> BuildConfig:
    """Read and validate a build file; relative paths resolve against its folder.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, or a schema error (one line naming
            the file, the field and the fix).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"build file {path} does not exist; write one (see `edgetl demo`, which writes an example)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; save it as UTF-8 YAML") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {exc.problem}; fix the syntax there") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: expected a mapping with at least `device:` and `data:`, got {got}")
    return config_from_dict(data, source=str(path), base=path.parent)


def check_names(config: BuildConfig, source: str) -> None:
    """Resolve the device and the model now, so a typo fails before any stage runs, naming the field.

    Raises:
        ConfigError: ``SOURCE: device: unknown device 'raspbery-pi-5'; did you mean ...``.
    """
    from edgetl.catalog import get_card
    from edgetl.profiles import load_profile

    for field, resolve in (("device", load_profile), ("model", get_card)):
        value = getattr(config, field)
        if field == "model" and value == "auto":
            continue
        try:
            resolve(value)
        except EdgetlError as exc:
            raise ConfigError(f"{source}: {field}: {exc}") from None
    if not Path(config.data).exists():
        raise ConfigError(f"{source}: data: {config.data} does not exist; point it at your image folder or CSV")


def config_from_dict(data: dict[str, Any], source: str = "build config",
                     base: str | os.PathLike[str] | None = None) -> BuildConfig:
    """Validate a build config given as a dict; relative paths resolve against ``base`` (default: the CWD)."""
    try:
        config = BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_config_error(exc, source)) from None
    return config.resolve_paths(base if base is not None else Path.cwd())
