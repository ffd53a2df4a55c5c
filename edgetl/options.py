"""Every stage option, defined once: its name, type, default, bounds and help text.

One pydantic model per stage (:class:`SelectOptions` with :class:`Constraints`, :class:`FinetuneOptions`,
:class:`ExportOptions`, :class:`ValidateOptions`), plus the inputs several commands share
(:class:`SourceOptions`, :class:`TargetOptions`, :class:`OutputOptions`), is the single source for the three
ways in:

- the Python API takes the model, or its fields as keyword arguments (validated by the same model);
- a build file's sections *are* these models (``BuildConfig.export`` is an :class:`ExportOptions`);
- the CLI's options are generated from the fields (:mod:`edgetl.cli.params`): ``--calib-method`` is
  ``ExportOptions.calibration.method``, and its ``--help`` is the field's description.

A stage model or the build file that carries a shared input takes the shared field itself
(:func:`shared_field`), so ``--resolution`` has one help text and one set of bounds everywhere.

The shared enumerations (precisions, calibration methods, budget metrics...) are defined here and
nowhere else. This module imports nothing heavier than pydantic, so every layer may use it.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edgetl.errors import ConfigError, did_you_mean

Precision = Literal["fp32", "fp16", "int8"]
ExportPrecision = Literal["fp32", "fp16", "int8", "auto"]
CalibMethod = Literal["minmax", "entropy", "percentile"]
Int8Mode = Literal["auto", "static", "dynamic"]
BudgetMetric = Literal["min", "p50", "p90", "p99"]
Strategy = Literal["auto", "linear", "partial", "full", "lp-ft"]
Domain = Literal["auto", "similar", "different"]
Augment = Literal["none", "light", "strong"]
TrainDevice = Literal["auto", "cpu", "cuda"]
TrainPrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
OnBadImage = Literal["skip", "error"]
ZooName = Literal["torchvision", "timm"]
Zoo = Literal["all", ZooName]

PRECISIONS: tuple[str, ...] = get_args(Precision)
EXPORT_PRECISIONS: tuple[str, ...] = get_args(ExportPrecision)
CALIB_METHODS: tuple[str, ...] = get_args(CalibMethod)
INT8_MODES: tuple[str, ...] = get_args(Int8Mode)
BUDGET_METRICS: tuple[str, ...] = get_args(BudgetMetric)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
AUGMENTATIONS: tuple[str, ...] = get_args(Augment)
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)
ZOOS: tuple[str, ...] = get_args(ZooName)

MIN_RESOLUTION, MAX_RESOLUTION = 16, 4096
#: The largest batch: memory grows with it (65536 images of 224 px are 39 GB of float32 input alone).
MAX_BATCH = 65536
#: The most images INT8 calibration reads, epochs trained, timed runs and data-loading processes.
MAX_CALIB_IMAGES, MAX_EPOCHS, MAX_ITERATIONS, MAX_WORKERS = 100_000, 100_000, 1_000_000, 256
MAX_SEED = 2**32 - 1
TABLE_ROWS = 15
"""Rows a ranking table shows when ``top`` is not given (machine output keeps every row)."""
#: The fraction of all images the automatic test split holds out, when every class keeps enough test images.
AUTO_TEST_FRACTION = 0.1
#: The fewest test images per class the automatic test split accepts; with fewer it holds out none.
AUTO_TEST_MIN_PER_CLASS = 5
#: The strategies ``--strategy auto`` tries (see :mod:`edgetl.finetune.trials`; lp-ft is not among them), least of
#: the backbone trained first.
TRIAL_STRATEGIES: tuple[str, ...] = ("linear", "partial", "full")
#: Epochs of each of auto's trials (at most ``--epochs``).
TRIAL_EPOCHS = 3
#: The most training images x epochs ``--strategy auto`` spends on the trials that train backbone blocks (the linear
#: probe's, on cached features, is not counted); above it auto follows the table without trials.
TRIAL_BUDGET = 30_000
#: Micro-graphs ``edgetl device calibrate`` times by default (a sample of the catalog's distinct kernels).
KERNEL_SAMPLES = 400
#: The frame rate ``select``'s default latency budget keeps up with, one frame per image: a camera's 30 fps (a
#: device profile may state its own, ``realtime_fps``). ``max_latency_ms: none`` lifts the budget.
REALTIME_FPS = 30
#: The word that lifts select's default latency budget (``--max-latency-ms none``).
NO_BUDGET = "none"
#: The device a stage targets when none is named (:func:`edgetl.device.profiles.default_device`).
DEFAULT_DEVICE = "this machine's calibrated profile, else x86-avx2 (raspberry-pi-5 on Arm)"
DEFAULT_DEVICE_HELP = f"[default: {DEFAULT_DEVICE}]"
REQUIRED = PydanticUndefined


def option(default: Any, help: str, *, flag: str | None = None, **bounds: Any) -> Any:
    """A field with its help text; ``flag`` overrides the generated CLI declaration (e.g. ``--a/--b``)."""
    return Field(default, description=help, json_schema_extra={"flag": flag} if flag else None, **bounds)


class NumbersNotBooleans(BaseModel):
    """A model whose int and float fields refuse a boolean (``epochs: true`` is not 1), the rest unchanged."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and unwrap_optional(field.annotation) in (int, float):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class StageOptions(NumbersNotBooleans):
    """Base of the option models: unknown keys, NaN, infinity and booleans given for numbers are errors;
    instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def cap_threads(threads: int | None) -> int | None:
    """``threads`` capped at this machine's cores, with a warning when capped (more threads only contend).

    Applied where a model is timed on this machine, not when the options are validated: with ``--on`` the threads
    are checked against the board's cores, on the board (:func:`edgetl.board.runner.check_threads`).

    Args:
        threads: the threads asked for, or None (the runtime's default).

    Returns:
        ``threads``, or the number of cores when it asked for more.
    """
    cores = os.cpu_count() or 1
    if threads is None or threads <= cores:
        return threads
    if threads not in _capped:
        _capped.add(threads)
        import logging

        logging.getLogger("edgetl").warning("%d threads asked for, but this machine has %d cores; using %d",
                                            threads, cores, cores)
    return cores


_capped: set[int] = set()


def shared_field(model: type[BaseModel], name: str, **changes: Any) -> Any:
    """The field ``name`` of a shared option model, for another model that carries the same input.

    The copy keeps the help text, the bounds and the CLI flag; ``changes`` sets attributes such as the
    ``default`` (``REQUIRED`` makes it required).
    """
    field = copy.deepcopy(model.model_fields[name])
    for key, value in changes.items():
        setattr(field, key, value)
    return field


#: Help of ``--model`` (``finetune``'s catalog model; ``export`` and ``predict`` take it as their SOURCE argument).
MODEL_HELP = "Catalog model name or id, e.g. resnet18 (see `edgetl models`)."


class SourceOptions(StageOptions):
    """The pretrained weights of a catalog model and its input size (``finetune``, ``export``, ``predict``)."""

    weights: str | None = option(
        None, "Pretrained weights of a catalog model: imagenet | none (random init) | PATH to a state_dict "
              "[default: imagenet; export needs it named for a catalog MODEL].")
    weights_dir: Path | None = option(
        None, "Offline folder of pretrained weights files [default: a build file's weights_dir, else "
              "$EDGETL_WEIGHTS_DIR].")
    resolution: int | None = option(
        None, "Input size in pixels [default: the model's own].", ge=MIN_RESOLUTION, le=MAX_RESOLUTION)


class TargetOptions(StageOptions):
    """Where the model will run, and how this machine times it."""

    device: str | None = option(
        None, "Target device profile: a name, an alias (jetson, rpi, x86, ...) or a YAML path [default: an "
              f"artifact's own device; else {DEFAULT_DEVICE}].", flag="--device/-d")
    threads: int | None = option(
        None, "ONNX Runtime threads when timing, at most the cores of this machine (or of the board, with --on) "
              "[default: the calibrated profile's when the device is this machine, else all cores].", ge=1)


class RemoteOptions(StageOptions):
    """Where a command runs: this machine, or a board reached over SSH (``--on``)."""

    on: str | None = option(
        None, "Run on a board over SSH instead of this machine: ssh://[user@]host[:port] (~/.ssh/config, the agent "
              "and known_hosts apply); the board needs only Python >= 3.8, numpy, Pillow and onnxruntime (or, "
              "for TensorRT on a Jetson, JetPack's TensorRT and cuda-python) [default: this machine].")
    device_python: str = option("python3", "The board's Python interpreter (with --on).", min_length=1)
    runtime: Literal["onnxruntime", "tensorrt"] = option(
        "onnxruntime", "The runtime on the board (with --on): onnxruntime on its CPU, or tensorrt on a Jetson (an "
                       "engine built there from the artifact's model.onnx, in the artifact's precision).")
    accept_new_host_key: bool = option(
        False, "With --on: trust a board's SSH host key the first time it is seen (StrictHostKeyChecking=accept-new; "
               "a changed key is refused all the same).")


class OutputOptions(StageOptions):
    """How a command reports its result (``as_json``: the name ``json`` is taken by pydantic)."""

    as_json: bool = option(False, "Print one JSON document on stdout; progress goes to stderr.", flag="--json")


class Constraints(StageOptions):
    """What a model must meet on the device (``None``: no limit, but for ``max_latency_ms`` and ``max_memory_mb``,
    whose defaults come from the device profile)."""

    max_latency_ms: Annotated[float, Field(gt=0)] | Literal["none"] | None = option(
        None, f"Latency budget in ms for one inference at --batch; {NO_BUDGET}: no latency budget [default: one "
              f"frame per image at the profile's real-time rate, else {REALTIME_FPS} fps: "
              f"{1000 / REALTIME_FPS:.1f} ms at batch 1].")
    max_memory_mb: float | None = option(
        None, "Memory budget in MB [default: the profile's model memory budget].", gt=0)
    max_size_mb: float | None = option(None, "Largest model file in MB at the precision.", gt=0)
    min_accuracy: float | None = option(None, "Lowest ImageNet top-1 in percent.", ge=0, le=100)

    @field_validator("max_latency_ms", mode="before")
    @classmethod
    def _none_in_any_case(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a number or '{NO_BUDGET}', got the boolean {str(value).lower()}")
        return NO_BUDGET if isinstance(value, str) and value.strip().lower() == NO_BUDGET else value

    @property
    def stated_latency_ms(self) -> float | None:
        """The latency budget given, or None when none is given or it is lifted (``none``)."""
        return None if self.max_latency_ms == NO_BUDGET else self.max_latency_ms

    def describe(self, latency_note: str = "") -> str:
        """``latency <= 5 ms, top-1 >= 75%``, or ``none``; ``latency_note`` follows the latency budget."""
        parts = []
        if self.max_latency_ms == NO_BUDGET:
            parts.append("no latency budget" + latency_note)
        elif self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms" + latency_note)
        if self.max_memory_mb is not None:
            parts.append(f"memory <= {self.max_memory_mb:g} MB")
        if self.max_size_mb is not None:
            parts.append(f"size <= {self.max_size_mb:g} MB")
        if self.min_accuracy is not None:
            parts.append(f"top-1 >= {self.min_accuracy:g}%")
        return ", ".join(parts) or "none"


class SelectOptions(StageOptions):
    """How ``edgetl select`` (and a build's ``model: auto``) ranks the catalog."""

    precision: Precision | None = option(
        None, "Deployment precision of the prediction [default: a fixed export precision, else fp16 where "
              "the device has it, else fp32].")
    resolution: int | None = shared_field(SourceOptions, "resolution")
    batch: int = option(1, "Images per inference, for latency and memory.", ge=1, le=MAX_BATCH)
    models: str | None = option(None, "Only catalog entries matching this glob, e.g. 'mobilenet*'.",
                                flag="--models/--filter")
    all_weights: bool = option(True, "Rank every weights tag, not only each model's DEFAULT.",
                               flag="--all-weights/--default-weights")
    zoo: Zoo = option("all", "Which model zoo: torchvision, timm (names timm/<arch>.<tag>) or all.")
    top: int | None = option(
        None, f"Rows to keep [default: {TABLE_ROWS} in the table and the report; JSON and CSV keep every row].",
        ge=1)


class FinetuneOptions(StageOptions):
    """How ``edgetl finetune`` trains (the model, the data and the run folder are given separately)."""

    weights: str = shared_field(SourceOptions, "weights", default="imagenet")
    strategy: Strategy = option(
        "auto", "What to train: auto (chosen from the data), linear, partial, full, or lp-ft (a linear probe, "
                "then the top blocks fine-tuned from its head, scaled back to its initial norm; the best epoch of both "
                f"phases is kept). auto with pretrained weights and a validation split trains {TRIAL_EPOCHS}-epoch "
                f"trials of {', '.join(TRIAL_STRATEGIES)} and keeps the best on validation, when training images x "
                f"{TRIAL_EPOCHS} epochs x {len(TRIAL_STRATEGIES) - 1} fine-tuning trials <= {TRIAL_BUDGET:,}; "
                "otherwise, and as the tie-breaker, it follows the table of dataset size x similarity to ImageNet.")
    unfreeze: int | None = option(
        None, "Blocks to train with --strategy partial or lp-ft [default: the last quarter].", ge=0)
    domain: Domain = option("auto", "Similarity of the images to ImageNet (auto: measured).")
    epochs: int = option(10, "Most epochs to train.", ge=1, le=MAX_EPOCHS)
    lr: float = option(1e-3, "The head's peak learning rate.", gt=0, le=10)
    layer_decay: float = option(0.7, "LR factor from one block to the one below.", gt=0, le=1)
    weight_decay: float = option(0.05, "AdamW weight decay (not on norms and biases).", ge=0, le=10)
    warmup_epochs: float = option(1.0, "Epochs of linear LR warm-up.", ge=0, le=MAX_EPOCHS)
    label_smoothing: float = option(0.0, "Cross-entropy label smoothing.", ge=0, lt=1)
    batch_size: int = option(32, "Images per step (per process under torchrun).", ge=1, le=MAX_BATCH)
    resolution: int | None = shared_field(SourceOptions, "resolution")
    val_split: float = option(
        0.2, "Fraction of each class's images held out for validation (it chooses the best epoch) when the dataset "
             "has no validation set.", ge=0, lt=1)
    test_split: float | None = option(
        None, "Fraction of all images held out, before training, for the final test: stratified per class, "
              "seeded, recorded in splits.json, never used to choose anything; the validation split is then "
              f"taken from the rest [default: {AUTO_TEST_FRACTION:g} of a dataset edgetl splits itself when "
              f"every class keeps at least {AUTO_TEST_MIN_PER_CLASS} test images, else 0; a dataset's own test/ "
              "folder or CSV test rows are used as given].", ge=0, lt=1)
    augment: Augment | None = option(None, "Augmentation [default: none for the linear probe, light otherwise].")
    balance: bool = option(False, "Sample classes equally often.")
    patience: int = option(5, "Stop after N epochs without a better val accuracy (0: never).", ge=0)
    seed: int = option(0, "Seed of the split, the initialisation and every epoch's randomness.", ge=0, le=MAX_SEED)
    device: TrainDevice = option("auto", "Where to train (not the target device).")
    precision_train: TrainPrecisionChoice = option(
        "auto", "Training arithmetic: auto is bf16 autocast + channels-last on CPUs and GPUs with native bf16, "
                "fp16 with a GradScaler on other GPUs, fp32 + channels-last on other CPUs.")
    workers: int = option(0, "Data-loading processes.", ge=0, le=MAX_WORKERS)
    on_bad_image: OnBadImage = option("skip", "What to do with an image that cannot be decoded.")
    deterministic: bool = option(False, "Deterministic algorithms only.")
    feature_cache: bool | None = option(
        None, "Train the linear probe on cached backbone features: on (an error where impossible; with auto, "
              "used if auto picks linear), off, or [default] whenever possible.")
    image_cache: bool | None = option(
        None, "Decode the images once and keep them in memory (uint8): on, off, or [default] when they fit in a "
              "quarter of the free RAM.")
    checkpoint_interval: float = option(
        30.0, "Seconds between checkpoints (0: every epoch; the last epoch is always saved).", ge=0)


class CalibrationOptions(StageOptions):
    """INT8 calibration (``--calib-*`` on the command line)."""

    data: Path | None = option(
        None, "Images to calibrate INT8 on [default: a stratified sample of the run's training images].")
    method: CalibMethod = option("minmax", "How activation ranges are chosen.")
    size: int = option(200, "Calibration images.", ge=1, le=MAX_CALIB_IMAGES)


class ExportOptions(StageOptions):
    """How ``edgetl export`` builds, judges and ships the artifact."""

    precision: ExportPrecision = option(
        "auto", "auto: build what the device can run, ship the fastest within the accuracy budget.")
    calibration: CalibrationOptions = option(CalibrationOptions(), "INT8 calibration.", flag="calib")
    int8_mode: Int8Mode = option("auto", "auto: dynamic for linear-heavy models (ViT), static QDQ otherwise.")
    exclude_op_types: tuple[str, ...] = option((), "Op types to keep in float when quantizing, e.g. Add,Mul.")
    opset: int = option(17, "ONNX opset (17 is safe for ONNX Runtime and TensorRT 8.6+).", ge=7, le=25)
    simplify: bool = option(True, "Simplify the graph with onnxslim (about 40 s on a ViT-B).")
    tensorrt: bool = option(False, "Also build model.engine here (TensorRT and the device's GPU).")
    c_header: bool = option(False, "Also write model_data.h (the ONNX bytes as a C array).")
    max_accuracy_drop: float = option(1.0, "Largest top-1 drop from FP32 to ship, in points.", ge=0, le=100)
    max_latency_ms: float | None = option(None, "Latency budget in ms; a miss exits with code 3.", gt=0)
    budget_metric: BudgetMetric = option(
        "p50", "Which statistic of the latency measured on the device itself the budget is judged on (elsewhere "
               "the budget is judged on the device's predicted latency, a single figure); export records it in the "
               "manifest [default: p50; validate: the one the artifact was exported with, p50 if it records none].")
    threads: int | None = shared_field(TargetOptions, "threads")
    rounds: int = option(60, "Timed runs per candidate (interleaved).", ge=1, le=MAX_ITERATIONS)
    seed: int = option(0, "Seed of the calibration sample.", ge=0, le=MAX_SEED)
    sign_key: Path | None = option(
        None, "Private key (PEM, Ed25519 or ECDSA P-256) to sign the manifest with, into manifest.sig; an "
              "encrypted key takes its passphrase from $EDGETL_SIGN_PASSPHRASE [default: not signed, "
              "only checksummed].")


class TimingOptions(StageOptions):
    """How a model is timed (``edgetl bench``, ``edgetl validate``)."""

    iterations: int = option(100, "Timed inferences.", ge=1, le=MAX_ITERATIONS)
    warmup: int = option(10, "Untimed inferences first.", ge=0, le=MAX_ITERATIONS)
    threads: int | None = shared_field(TargetOptions, "threads")


class ValidateOptions(TimingOptions):
    """What ``edgetl validate`` measures and the budgets it judges."""

    data: Path | None = option(None, "Class folders (named like labels.json) to measure top-1 accuracy on.")
    run: Path | None = option(
        None, "The run folder the artifact was exported from: measure top-1 on its --split, read from its "
              "splits.json (instead of --data).")
    split: Literal["train", "val", "test"] | None = option(
        None, "Which split of --run to measure top-1 on, with its count, 95% Wilson interval and per-class "
              "accuracy [default: test].")
    max_latency_ms: float | None = option(None, "Latency budget in ms; a miss exits with code 3.", gt=0)
    max_memory_mb: float | None = option(
        None, "Memory budget in MB; a miss exits with code 3 [default: the profile's model memory budget].", gt=0)
    budget_metric: BudgetMetric | None = shared_field(ExportOptions, "budget_metric", default=None)
    verify_key: Path | None = option(
        None, "Public key (PEM) the artifact must be signed with: a missing or invalid signature, or any changed "
              "file, exits 1 [default: check the checksums only].")
    on: str | None = shared_field(RemoteOptions, "on")
    device_python: str = shared_field(RemoteOptions, "device_python")
    runtime: Literal["onnxruntime", "tensorrt"] = shared_field(RemoteOptions, "runtime")
    accept_new_host_key: bool = shared_field(RemoteOptions, "accept_new_host_key")
    report: Path | None = option(
        None, "Write the report (validation.json) to this file or folder instead of into the artifact, e.g. for "
              "an artifact on read-only media [default: ARTIFACT_DIR/validation.json, skipped with a warning "
              "when the artifact is not writable].")


#: The shared inputs each stage takes, whole: its API accepts their fields as keyword arguments, its command
#: declares their flags, and a build file takes them as top-level keys (for the stages a build runs). A field
#: added to one of these models reaches every stage listed with it; read it where it is used.
STAGE_INPUTS: dict[str, tuple[type[StageOptions], ...]] = {
    "select": (TargetOptions,),
    "finetune": (SourceOptions,),
    "export": (SourceOptions, TargetOptions),
    "validate": (TargetOptions,),
    "predict": (SourceOptions, RemoteOptions),
}


def shared_models(*stages: str) -> tuple[type[StageOptions], ...]:
    """The shared models ``stages`` take (each once, in order)."""
    return tuple(dict.fromkeys(m for stage in stages for m in STAGE_INPUTS[stage]))


def same_option(a: type[BaseModel], b: type[BaseModel], name: str) -> bool:
    """Whether ``a`` and ``b`` both have the option ``name`` with one meaning (one is the other's
    :func:`shared_field` copy), as ``ExportOptions.threads`` and ``TargetOptions.threads``; not
    ``FinetuneOptions.device`` (where to train) and ``TargetOptions.device``."""
    fa, fb = a.model_fields.get(name), b.model_fields.get(name)
    return fa is not None and fb is not None and fa.description == fb.description


M = TypeVar("M", bound=StageOptions)


def resolve(model: type[M], options: M | None, overrides: dict[str, Any], where: str) -> M:
    """``options`` (or the defaults) with ``overrides`` applied, validated by ``model``.

    Raises:
        ConfigError: one line naming ``where`` and the option, e.g. ``export(): opset: ...``.
    """
    if options is not None and not isinstance(options, model):
        raise ConfigError(f"{where}: options must be a {model.__name__}, got {type(options).__name__}")
    data = options.model_dump() if options is not None else {}
    data.update(overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model, where)) from None


def shared_inputs(model: type[M], where: str, **values: Any) -> M:
    """API keyword arguments that are fields of a shared model (``weights=``, ``resolution=``...), validated by
    it; a path given for a text field is taken as text.

    Raises:
        ConfigError: one line naming ``where`` and the field, e.g. ``export(): resolution: ...``.
    """
    text = {name for name, f in model.model_fields.items() if unwrap_optional(f.annotation) is str}
    given = {k: os.fspath(v) if k in text and isinstance(v, os.PathLike) else v for k, v in values.items()}
    return resolve(model, None, given, where)


def take_inputs(stage: str, kwargs: dict[str, Any], *models: tuple[type[StageOptions], StageOptions | None],
                ) -> tuple[list[Any], dict[type[StageOptions], Any]]:
    """A stage function's keyword arguments, split between its stage models and the shared models it takes
    (:data:`STAGE_INPUTS`), each validated.

    A keyword both a stage model and a shared model define (``threads``: a :func:`shared_field` copy) is the
    stage model's; the shared model then holds the stage's value, so either says the same.

    Args:
        stage: the stage's name (``export``); errors say ``export(): ...``.
        kwargs: the keyword arguments (``None`` values of shared fields count as not given).
        models: ``(model, options)`` per stage model: the class and the options object given (or None).

    Returns:
        The stage options in the order of ``models``, and each shared model's validated instance.

    Raises:
        ConfigError: an unknown keyword (with a suggestion) or a bad value, in one line.
    """
    where = f"{stage}()"
    shared = STAGE_INPUTS[stage]
    parts = split_overrides(kwargs, *(m for m, _ in models), *shared, where=where)
    stage_opts = [resolve(m, given, part, where) for (m, given), part in zip(models, parts, strict=False)]
    inputs: dict[type[StageOptions], Any] = {}
    for model, part in zip(shared, parts[len(models):], strict=True):
        values = {k: v for k, v in part.items() if v is not None}
        for opts in stage_opts:
            values.update({k: getattr(opts, k) for k in model.model_fields if same_option(type(opts), model, k)})
        inputs[model] = shared_inputs(model, where, **values)
    return stage_opts, inputs


def split_overrides(kwargs: dict[str, Any], *models: type[BaseModel], where: str) -> list[dict[str, Any]]:
    """Sort keyword arguments by the model that defines them; an unknown one is a one-line error."""
    parts: list[dict[str, Any]] = [{} for _ in models]
    for key, value in kwargs.items():
        owner = next((i for i, m in enumerate(models) if key in m.model_fields), None)
        if owner is None:
            known = [k for m in models for k in m.model_fields]
            hint = did_you_mean(key, known, n=1)
            maybe = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{where}: unknown option '{key}'{maybe}")
        parts[owner][key] = value
    return parts


def _unwrap(tp: Any) -> tuple[Any, FieldInfo | None]:
    """``tp`` without ``Annotated`` and ``| None``, and the field info an ``Annotated`` carried (or None)."""
    info = None
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp, *meta = typing.get_args(tp)
            info = next((m for m in meta if isinstance(m, FieldInfo)), info)
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp, info
            tp = args[0]
        else:
            return tp, info


def _lookup(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, FieldInfo | None]:
    """The type at ``loc`` (keys by alias or name through sub-models, list indices, dict keys and values) and the
    field info that describes it; ``(None, None)`` where ``loc`` leaves the schema."""
    tp: Any = model
    field: FieldInfo | None = None
    for part in loc:
        tp, _ = _unwrap(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = {f.alias or name: f for name, f in tp.model_fields.items()}.get(str(part))
            if field is None:
                return None, None
            tp = field.annotation
        elif origin is list and typing.get_args(tp):
            tp = typing.get_args(tp)[0]
        elif origin is dict and typing.get_args(tp):
            tp = typing.get_args(tp)[0 if part == "[key]" else 1]
        else:
            return None, None
    tp, inner = _unwrap(tp)
    return tp, inner or field


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    """The pydantic field (or annotated type) at ``loc``, or None."""
    return _lookup(model, loc)[1] if loc else None


def field_help(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The help text of the field at ``loc``."""
    field = _field_at(model, loc)
    return None if field is None else field.description


def sub_model(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The option model that holds the fields below ``loc`` (``model`` itself for an empty ``loc``)."""
    sub = _lookup(model, loc)[0]
    return sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None


def unwrap_optional(tp: Any) -> Any:
    """``X`` for ``X | None``; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def keys_of(model: type[BaseModel]) -> list[str]:
    """The keys a mapping for ``model`` may hold (aliases where a field has one)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def dotted(loc: tuple[Any, ...]) -> str:
    """A location as the user writes it in YAML: ``memory.bandwidth_gbs``, ``reference[1].runtime``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def example(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """What to write at ``loc``: the field's first ``examples`` entry, a model's ``EXAMPLE``, its required keys,
    a choice, or ``...``."""
    tp, field = _lookup(model, loc)
    if field is not None and field.examples:
        return str(field.examples[0])
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        given = getattr(tp, "EXAMPLE", None)
        return given or "{" + ", ".join(f"{k}: ..." for k in keys_of(tp) if tp.model_fields[k].is_required()) + "}"
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return f"{choices[0]}  # one of {', '.join(map(str, choices))}"
    return {list: "[...]", dict: "{...}"}.get(typing.get_origin(tp), "...")


def describe_error(error: dict[str, Any], model: type[BaseModel], name: Any = None) -> str:
    """One pydantic error as ``field: what is wrong; how to fix it``.

    Args:
        error: one item of ``ValidationError.errors()``.
        model: the model that was validated (for allowed keys, examples and help texts).
        name: turns a location tuple (of strings) into the user's spelling (``--calib-method``); default:
            :func:`dotted` (``export.opset``, ``reference[1].runtime``).
    """
    loc = tuple(error.get("loc", ()))
    where = name(tuple(str(p) for p in loc)) if name and loc else dotted(loc)
    kind = error.get("type", "")
    msg = _lower_first(str(error.get("msg", "")).removeprefix("Value error, "))
    given = error.get("input")
    if kind == "extra_forbidden":
        allowed = keys_of(sub_model(model, loc[:-1]) or model)
        hint = did_you_mean(str(loc[-1]), allowed, n=1)
        maybe = f"did you mean '{hint[0]}'? " if hint else ""
        return f"{where}: unknown key; {maybe}remove or rename it (allowed here: {', '.join(allowed)})"
    if kind == "missing":
        return f"{where}: field required; add `{loc[-1]}: {example(model, loc)}`"
    if kind in ("model_type", "dict_type"):
        parent = sub_model(model, loc)
        keys = ", ".join(keys_of(parent)) if parent else "..."
        return f"{where}: expected a mapping ({keys}), got {given!r}"
    if not loc:
        return msg
    if "[key]" in loc:
        msg = msg.replace("input should", "key should")
    elif isinstance(given, (int, float, str, bool)) and kind != "value_error":
        msg = f"{msg} (got {given!r})"
    help_text = field_help(model, loc)
    about = f" — {_lower_first(help_text.rstrip('.'))}" if help_text else ""
    return f"{where}: {msg}{about}"


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if text[:1].isupper() and not text[:2].isupper() else text


def format_errors(exc: ValidationError, model: type[BaseModel], source: str, limit: int = 3,
                  name: Any = None) -> str:
    """One line, ``source: field: what is wrong; how to fix it | ...``, unknown keys first (they explain the rest:
    a typo also leaves a field missing). Build files, device profiles, the API and the CLI all word errors so.

    Args:
        exc: the error of validating ``model``.
        model: the model that was validated.
        source: where the data came from (a file, ``export()``, a command).
        limit: errors shown; the rest are counted.
        name: see :func:`describe_error`.
    """
    errors = sorted(_one_error_per_union(exc.errors(include_url=False), model),
                    key=lambda e: e.get("type") != "extra_forbidden")
    text = " | ".join(describe_error(e, model, name) for e in errors[:limit])
    if len(errors) > limit:
        text += f" (and {len(errors) - limit} more)"
    return f"{source}: " + " ".join(text.split())


def _one_error_per_union(errors: list[Any], model: type[BaseModel]) -> list[Any]:
    """A value that no member of a union field accepts (a latency budget: a number or ``none``) gives one error per
    member, located below the field by the member's name: keep the first member's, located at the field."""
    out, seen = [], set()
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if len(loc) > 1 and _lookup(model, loc) == (None, None):
            parent = _lookup(model, loc[:-1])[0]
            if typing.get_origin(parent) in (typing.Union, types.UnionType):
                if loc[:-1] in seen:
                    continue
                seen.add(loc[:-1])
                error = {**error, "loc": loc[:-1]}
        out.append(error)
    return out


def reference(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per option, ``name (default): help``, nested models flattened as ``calibration.method``."""
    lines = []
    for name, field in model.model_fields.items():
        sub = unwrap_optional(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            lines += reference(sub, f"{prefix}{name}.")
            continue
        default = field.default
        shown = "" if default is None else f" (default {default!r})"
        lines.append(f"{prefix}{name}{shown}: {field.description}")
    return lines


def documented(model: type[BaseModel] | None, stage: str | None = None):
    """Append ``model``'s option reference (and that of the shared models ``stage`` takes) to a stage function's
    docstring (the help text lives once)."""

    def block(title: str, lines: list[str]) -> str:
        body = "\n".join(f"        {line}" for line in lines)
        return f"\n\n    {title}:\n{body}\n" if lines else ""

    def decorate(func):
        text = (func.__doc__ or "").rstrip()
        if model is not None:
            text += block(f"Options (fields of :class:`{model.__name__}`, also accepted as keyword arguments)",
                          reference(model)).rstrip()
        for shared in STAGE_INPUTS.get(stage, ()) if stage else ():
            lines = [line for line in reference(shared)
                     if model is None or not same_option(model, shared, line.split(" ", 1)[0].rstrip(":"))]
            text += block(f"Shared inputs (fields of :class:`{shared.__name__}`, accepted as keyword arguments)",
                          lines).rstrip()
        func.__doc__ = text + "\n"
        return func

    return decorate
