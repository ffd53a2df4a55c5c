"""The build file of ``edgetl build``: its schema, loading, and one-line error messages.

Every section is a pydantic model that rejects unknown keys; an error names the file, the field and
the fix (``pipeline.yaml: finetune.epoch: unknown key; did you mean 'epochs'?``). Relative paths
resolve against the build file's folder. See :mod:`edgetl.pipeline` for what a build does with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetl._io import load_yaml
from edgetl.device.profiles import load_profile
from edgetl.errors import ConfigError, EdgetlError
from edgetl.options import (
    REQUIRED,
    Constraints,
    ExportOptions,
    FinetuneOptions,
    SelectOptions,
    SourceOptions,
    StageOptions,
    TargetOptions,
    ValidateOptions,
    format_errors,
    shared_field,
)
from edgetl.zoo.catalog import get_card


class BuildConfig(StageOptions):
    """A build file: the device and its constraints, the model, the data, and each stage's options."""

    device: str = shared_field(TargetOptions, "device", default=REQUIRED)
    constraints: Constraints = Constraints()
    model: str = Field("auto", description="a catalog name, or auto: select's most accurate model that fits")
    data: Path = Field(description="class folders, a folder with train/ and val/, or a CSV of path,label",
                       examples=["path/to/images"])
    weights_dir: Path | None = shared_field(SourceOptions, "weights_dir")
    data_fingerprint: Literal["stat", "content"] = "stat"
    select: SelectOptions = SelectOptions()
    finetune: FinetuneOptions = FinetuneOptions()
    export: ExportOptions = ExportOptions()
    validate_: ValidateOptions = Field(ValidateOptions(), alias="validate")
    out: Path = Field(Path("build"), description="output folder")

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

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
                "sign_key": fix(self.export.sign_key),
            }),
            "validate_": self.validate_.model_copy(update={"data": fix(self.validate_.data),
                                                           "verify_key": fix(self.validate_.verify_key)}),
        })

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-friendly data, with the YAML key names."""
        return self.model_dump(mode="json", by_alias=True)


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
