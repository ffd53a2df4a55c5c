"""The build file of ``edgetl build``: its schema, loading, and one-line error messages.

Every section is a pydantic model that rejects unknown keys; an error names the file, the field and
the fix (``pipeline.yaml: finetune.epoch: unknown key; did you mean 'epochs'?``). Relative paths
resolve against the build file's folder. See :mod:`edgetl.pipeline` for what a build does with it.

The shared inputs of the build's stages (:data:`edgetl.options.STAGE_INPUTS`: ``device``, ``threads``,
``weights``, ``weights_dir``, ``resolution``...) are top-level keys: :class:`BuildConfig` inherits their
models. A top-level key is the default of every section that has the same option (``threads: 2`` times the
export and the validation with two threads unless ``export.threads`` or ``validate.threads`` says otherwise);
the pipeline passes the others to each stage that takes them (:func:`stage_inputs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetl._io import load_yaml
from edgetl.device.profiles import load_profile
from edgetl.errors import ConfigError, EdgetlError
from edgetl.options import (
    REQUIRED,
    STAGE_INPUTS,
    Constraints,
    ExportOptions,
    FinetuneOptions,
    SelectOptions,
    StageOptions,
    TargetOptions,
    ValidateOptions,
    format_errors,
    same_option,
    shared_field,
    shared_models,
)
from edgetl.zoo.catalog import get_card

BUILD_STAGES = ("select", "finetune", "export", "validate")
#: The shared models whose fields a build file takes as top-level keys: every one its stages take.
BUILD_INPUTS = shared_models(*BUILD_STAGES)


class BuildConfig(*reversed(BUILD_INPUTS)):  # type: ignore[misc]  # the first model's keys come first
    """A build file: the device and its constraints, the model, the data, the other shared inputs of the stages
    (top-level keys, as :data:`BUILD_INPUTS` define them), and each stage's options."""

    device: str = shared_field(TargetOptions, "device", default=REQUIRED)
    constraints: Constraints = Constraints()
    model: str = Field("auto", description="a catalog name, or auto: select's most accurate model that fits")
    data: Path = Field(description="class folders, a folder with train/ and val/, or a CSV of path,label",
                       examples=["path/to/images"])
    data_fingerprint: Literal["stat", "content"] = "stat"
    select: SelectOptions = SelectOptions()
    finetune: FinetuneOptions = FinetuneOptions()
    export: ExportOptions = ExportOptions()
    validate_: ValidateOptions = Field(ValidateOptions(), alias="validate")
    out: Path = Field(Path("build"), description="output folder")

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _top_level_defaults(cls, data: Any) -> Any:
        """A top-level shared input is the default of each section's copy of the same option."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for model in BUILD_INPUTS:
            for key in (k for k in model.model_fields if data.get(k) is not None):
                for name, section in _sections(cls):
                    if not same_option(section, model, key):
                        continue
                    alias = cls.model_fields[name].alias or name
                    slot = alias if alias in data or name not in data else name
                    given = data.get(slot, {})
                    if isinstance(given, BaseModel):
                        given = given.model_dump(exclude_unset=True)
                    if isinstance(given, dict) and key not in given:
                        data[slot] = {**given, key: data[key]}
        return data

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

        def fix_weights(spec: str | None) -> str | None:
            return spec if spec is None or spec.lower() in ("imagenet", "none") else str(fix(Path(spec)))

        device = self.device
        if device.lower().endswith((".yaml", ".yml")) or "/" in device or os.sep in device:
            device = str(fix(Path(device)))
        return self.model_copy(update={
            "device": device,
            "weights": fix_weights(self.weights),
            "data": fix(self.data),
            "weights_dir": fix(self.weights_dir),
            "out": fix(self.out),
            "finetune": self.finetune.model_copy(update={"weights": fix_weights(self.finetune.weights)}),
            "export": self.export.model_copy(update={
                "calibration": self.export.calibration.model_copy(update={"data": fix(self.export.calibration.data)}),
                "sign_key": fix(self.export.sign_key),
            }),
            "validate_": self.validate_.model_copy(update={"data": fix(self.validate_.data),
                                                           "run": fix(self.validate_.run),
                                                           "verify_key": fix(self.validate_.verify_key)}),
        })

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-friendly data, with the YAML key names."""
        return self.model_dump(mode="json", by_alias=True)


def _sections(config: type[BaseModel]) -> list[tuple[str, type[StageOptions]]]:
    """The build file's sections: ``(field name, option model)``."""
    return [(name, f.annotation) for name, f in config.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, StageOptions)]


def stage_inputs(config: BuildConfig, stage: str, options: BaseModel | None = None,
                 skip: tuple[type[BaseModel], ...] = (), given: tuple[str, ...] = ()) -> dict[str, Any]:
    """The build file's top-level shared inputs that ``stage`` takes (:data:`edgetl.options.STAGE_INPUTS`), as
    keyword arguments of its function: the ones set, except those of ``skip`` models (the pipeline supplies
    them: export's source is the run), the ``given`` names, and those the stage's ``options`` carry (their
    section took the top-level value as its default)."""
    kwargs: dict[str, Any] = {}
    for model in STAGE_INPUTS[stage]:
        if model in skip:
            continue
        for key in model.model_fields:
            value = getattr(config, key)
            if value is None or key in given or (options is not None and key in type(options).model_fields):
                continue
            kwargs[key] = value
    return kwargs


def load_build_config(path: str | os.PathLike[str]) -> BuildConfig:
    """Read and validate a build file; relative paths resolve against its folder.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML (a key given twice too), or a schema error
            (one line naming the file, the line or the field, and the fix).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"build file {path} does not exist; write one (see `edgetl demo`, which writes an example)")
    data = load_yaml(path, "the build file", "a mapping with at least `device:` and `data:`",
                     "see `edgetl demo`, which writes an example")
    return config_from_dict(data, source=str(path), base=path.parent)


def check_names(config: BuildConfig, source: str) -> None:
    """Resolve the device and the model now, so a typo fails before any stage runs, naming the field.

    Raises:
        ConfigError: ``SOURCE: device: unknown device 'raspbery-pi-5'; did you mean ...``.
    """
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
        raise ConfigError(format_errors(exc, BuildConfig, source)) from None
    return config.resolve_paths(base if base is not None else Path.cwd())
