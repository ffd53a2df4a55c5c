"""``finetune()``: train a catalog backbone on a folder of images and write a run folder.

RUN_DIR after a run::

    config.yaml               the resolved options (what --resume reuses)
    splits.json               the train/val/test files and labels, how the test split was made, the skipped files
    model.safetensors         the best weights (highest validation accuracy)
    checkpoint.json           model, weights source, classes, strategy, resolution, preprocess,
                              per-epoch metrics, final metrics: what load_trained_model() reads
    last-<gen>.safetensors    weights after the last finished epoch (for --resume)
    last-<gen>.optim.safetensors  AdamW state after the last finished epoch
    last.json                 loop, scheduler and optimizer scalars after the last finished epoch, naming the
                              generation <gen> of the two files above (the three are written as a set)
    metrics.json              per-epoch metrics; what chose the model (selection: val accuracy, best epoch);
                              test accuracy with its count, 95% Wilson interval and per-class accuracy; confusion
    curves.png, confusion.png the training curves and the confusion matrix

(:class:`edgetl.finetune.rundir.RunDir` names these files.)

Nothing is ever pickled: tensors go to safetensors, everything else to JSON/YAML.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from edgetl import data as D
from edgetl._io import atomic_write_json, atomic_write_text
from edgetl.errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted, WeightsError
from edgetl.finetune import checkpoint as ckpt
from edgetl.finetune.conv_dtype import choose_fp32_convs, trainable_grouped_convs, with_fp32_convs
from edgetl.finetune.distributed import (
    DistInfo,
    EpochSampler,
    ShardSampler,
    barrier,
    broadcast_mask,
    init_distributed,
    shutdown,
)
from edgetl.finetune.features import DEFAULT_MAX_MEMORY_MB, FeatureBatches, extract_features, head_is_output
from edgetl.finetune.lpft import FT_LR_SCALE, fit_probe
from edgetl.finetune.model import load_trained_model as _load
from edgetl.finetune.precision import resolve_precision
from edgetl.finetune.rundir import RunDir
from edgetl.finetune.strategy import (
    DOMAIN_SAMPLE_IMAGES,
    DomainEstimate,
    StrategyDecision,
    apply_strategy,
    build_param_groups,
    choose_strategy,
    describe_param_groups,
    estimate_domain,
)
from edgetl.finetune.trainer import (
    FitState,
    ProgressDisplay,
    TrainConfig,
    Trainer,
    first_nonfinite,
    make_scheduler,
    resolve_device,
    seed_everything,
)
from edgetl.finetune.trials import Trial, TrialReport, plan_trials
from edgetl.folders import RUN_SPLITS_FORMAT, folder_lock, require_ours
from edgetl.options import FinetuneOptions, SourceOptions, documented, take_inputs
from edgetl.zoo.catalog import get_card, replace_head, torchvision_version
from edgetl.zoo.weights import load_model

if TYPE_CHECKING:
    from edgetl.finetune.model import TrainedModel

log = logging.getLogger(__name__)

# Options that define the training computation; --resume takes them from config.yaml.
_RUN_OPTIONS = (
    "model", "data", "weights", "weights_dir", "strategy", "unfreeze", "domain", "epochs", "lr",
    "layer_decay", "weight_decay", "warmup_epochs", "label_smoothing", "batch_size", "resolution", "seed",
    "val_split", "test_split", "augment", "balance", "on_bad_image", "patience", "deterministic",
    "feature_cache", "precision_train",
)


@dataclass
class RunResult:
    """What :func:`finetune` returns.

    Attributes:
        run_dir: the run folder.
        checkpoint: the best weights (``RUN_DIR/model.safetensors``).
        model: the catalog id of the backbone.
        classes: class names in output order.
        strategy: the strategy used and why.
        val_accuracy, test_accuracy: final accuracy of the best weights (None without that split). The
            validation split chose the weights, so only ``test_accuracy`` is an unbiased estimate; ``metrics``
            holds its image count, 95% Wilson interval and per-class accuracy.
        best_epoch: the epoch whose weights were kept (0: lp-ft's linear probe, which no fine-tuning epoch beat).
        epochs_run: epochs finished (fewer than asked after an early stop).
        stopped_early: whether early stopping ended the run.
        feature_cache: whether the linear probe trained on cached features.
        weights: the starting weights (``imagenet``, ``none`` or a PATH).
        skipped: unreadable images left out, as ``(path, reason)``.
        metrics: the content of ``metrics.json``.
        resumed_from: the epoch a resumed run started from (None for a fresh run).
        seconds: wall-clock time of the call.
    """

    run_dir: Path
    checkpoint: Path
    model: str
    classes: list[str]
    strategy: StrategyDecision
    val_accuracy: float | None
    test_accuracy: float | None
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    feature_cache: bool
    weights: str = "imagenet"
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (``edgetl finetune --json``)."""
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "model": self.model,
            "weights": self.weights,
            "classes": self.classes,
            "strategy": self.strategy.to_dict(),
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "test_images": (self.metrics.get("test") or {}).get("images"),
            "test_ci95": (self.metrics.get("test") or {}).get("ci95"),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "feature_cache": self.feature_cache,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 3),
        }


def load_trained_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> TrainedModel:
    """Load a run's best fine-tuned model (see :func:`edgetl.finetune.model.load_trained_model`).

    Returns:
        A :class:`~edgetl.finetune.model.TrainedModel`: an ``nn.Module`` in eval mode with ``card``,
        ``classes``, ``preprocess``, ``resolution`` and ``metrics``.
    """

    return _load(run_dir, device)


# --- options -------------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> dict[str, Any]:

    path = RunDir(run_dir).config
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {path.name}: it is not an edgetl run folder to resume")
    try:
        return dict(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML ({exc})") from exc


def _resume_options(run_dir: Path, given: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    saved = _read_config(run_dir)
    if not RunDir(run_dir).can_resume():
        raise CheckpointError(f"{run_dir} has no finished epoch to resume from; start it over with --restart")
    if given.get("model") and get_card(given["model"]).id != saved.get("model"):
        raise ConfigError(
            f"{run_dir} was trained with {saved.get('model')}, not {given['model']}; "
            "omit --model to resume it, or choose another --out"
        )
    if given.get("data") and str(Path(given["data"]).expanduser().resolve()) != saved.get("data"):
        raise ConfigError(
            f"{run_dir} was trained on {saved.get('data')}, not {given['data']}; omit --data to resume it"
        )
    changed = [
        k for k in _RUN_OPTIONS
        if k not in ("model", "data") and k in saved and k in explicit and given.get(k) is not None
        and not _same_option(given.get(k), saved[k])
    ]
    if changed:
        was = ", ".join(f"{k}={saved[k]!r} (given {given[k]!r})" for k in changed)
        raise ConfigError(
            f"--resume continues {run_dir} with the options it was started with, and these differ: {was}; "
            "drop them to resume, or start a new run in another --out"
        )
    opts = dict(given)
    opts.update({k: saved[k] for k in _RUN_OPTIONS if k in saved})
    return opts


def _same_option(given: Any, saved: Any) -> bool:
    if given == saved:
        return True
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)) and not isinstance(given, bool):
        return float(given) == float(saved)
    return str(given) == str(saved)


def _check_fresh(run_dir: Path) -> None:
    if RunDir(run_dir).has_checkpoint():
        raise CheckpointError(
            f"{run_dir} already holds a run; resume it with --resume, start it over with --restart, "
            "or choose another --out"
        )


def _check_batchnorm_batch(net: torch.nn.Module, batch_size: int, strategy: str) -> None:
    """Training BatchNorm needs two images per batch: say so before anything is written, not with torch's
    traceback mid-epoch. The linear probe freezes every BatchNorm, so it may train one image at a time."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if batch_size < 2 and has_bn and strategy != "linear":
        raise ConfigError(
            f"--batch-size 1 cannot train this model with the {strategy} strategy: its BatchNorm layers need at "
            "least 2 images per batch; use --batch-size 2 or more (or --strategy linear, which freezes them)"
        )


def _splits_digest(splits: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(splits.classes).encode())
    for name in ("train", "val", "test"):
        for path, label in getattr(splits, name):
            h.update(f"{name}\0{path}\0{label}\n".encode())
    return h.hexdigest()


# --- the run -------------------------------------------------------------------------------------


@documented(FinetuneOptions, "finetune")
def finetune(
    model: str | None = None,
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    options: FinetuneOptions | None = None,
    *,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    callbacks: tuple[Callable[[int, dict[str, Any]], None], ...] = (),
    on_decision: Callable[[StrategyDecision], None] | None = None,
    **kwargs: Any,
) -> RunResult:
    """Fine-tune a catalog backbone on an image dataset and write the run folder ``out``.

    Args:
        model: catalog name or id (``resnet18``, ``mobilenet_v3_small.IMAGENET1K_V1``).
        data: a folder of class folders, a folder with ``train/`` and ``val/``, or a CSV
            (see :func:`edgetl.data.scan_dataset`).
        out: the run folder to write.
        options: how to train (:class:`~edgetl.options.FinetuneOptions`); its fields may also be given
            as keyword arguments (``finetune("resnet18", "images/", "runs/a", epochs=5)``).
        resume: continue the run in ``out`` from its last finished epoch, with its saved options;
            options given now that differ from the saved ones are an error.
        restart: delete the run in ``out`` and start over (for a run that ``resume`` cannot continue). Only an
            edgetl run folder is cleared, and only once the new run's inputs have been checked; any other
            folder is refused.
        progress: show progress bars on stderr.
        callbacks: called with ``(epoch, record)`` after each finished (and saved) epoch.
        on_decision: called with the strategy decision before training starts.
        **kwargs: fields of :class:`~edgetl.options.FinetuneOptions` and of the shared inputs finetune takes
            (:data:`~edgetl.options.STAGE_INPUTS`), e.g. ``weights_dir`` (an offline folder of pretrained
            weights files; default ``$EDGETL_WEIGHTS_DIR``).

    Returns:
        The run's result: accuracies, best epoch, checkpoint path, strategy and reason.

    Raises:
        DataError, WeightsError, ConfigError, CheckpointError: bad input (one-line message).
        TrainingInterrupted: Ctrl-C; the last finished epoch is saved (exit code 130 in the CLI).
    """
    (opts,), inputs = take_inputs("finetune", kwargs, (FinetuneOptions, options))
    weights_dir = inputs[SourceOptions].weights_dir
    if out is None:
        raise ConfigError("finetune needs an output folder (out=... / --out RUN_DIR)")
    run_dir = require_ours(out, ("run",), "--out", "a run")
    explicit = {**(options.model_dump(include=options.model_fields_set) if options else {}), **kwargs}
    given = {**opts.model_dump(mode="json"), "model": model, "data": data,
             "weights_dir": None if weights_dir is None else os.fspath(weights_dir)}
    if resume and restart:
        raise ConfigError("--resume continues the run in --out and --restart deletes it; give one of them")
    if not resume and (not model or not data):
        raise ConfigError("finetune needs a model and a dataset (--model NAME --data DIR)")
    with _run_lock(run_dir), sigterm_as_interrupt():
        if resume:
            run_opts = _resume_options(run_dir, given, set(explicit) | {"weights_dir"})
        else:
            if not restart:
                _check_fresh(run_dir)
            run_opts = {**given, "model": get_card(model).id, "data": str(Path(data).expanduser().resolve())}
        run_opts.update(device=opts.device, workers=opts.workers)
        run = _Run(run_dir, run_opts, resume, progress, callbacks, on_decision, opts.checkpoint_interval)
        run.restart = restart
        return run.run()


def _run_lock(run_dir: Path) -> Any:
    """The run folder's lock: a second finetune into it fails at once. Under torchrun rank 0 holds it."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    return folder_lock(run_dir, "finetune")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, ``docker stop``) stops the run as Ctrl-C does: the last finished
    epoch is saved. Outside the training loop it raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Run:
    """One fine-tuning run, step by step (kept in one object so the steps can share their state)."""

    def __init__(self, run_dir: Path, opts: dict[str, Any], resume: bool, progress: bool,
                 callbacks: tuple[Callable[..., None], ...], on_decision: Callable[[StrategyDecision], None] | None,
                 checkpoint_interval: float = 30.0):
        self.run_dir = run_dir
        self.rundir = RunDir(run_dir)
        self.opts = opts
        self.resume = resume
        self.progress = progress
        self.callbacks = callbacks
        self.on_decision = on_decision
        self.start = time.perf_counter()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val: Any = None
        self.checkpoint_interval = checkpoint_interval
        self._pending_best: dict[str, Any] | None = None
        self._pending_last: tuple[Any, Any, dict[str, Any]] | None = None
        self._last_write = time.monotonic()
        self.restart = False
        self.resumed_from: int | None = None
        self.label = ""  # before "epoch k/N" in the progress bars

    # -- setup --

    def run(self) -> RunResult:
        o = self.opts
        self.device = resolve_device(o["device"])
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            seed_everything(int(o["seed"]), bool(o["deterministic"]))
            self._check_options()
            return self._run()
        except TrainingError as exc:  # from the probe or the main loop: say what is kept and how to go on
            raise TrainingError(f"{exc}; training stopped: {self._diverged_hint()}", exc.epoch, exc.step) from exc
        finally:
            torch.use_deterministic_algorithms(deterministic)  # leave the process as it was
            shutdown(self.dist)

    def _check_options(self) -> None:
        o = self.opts
        for key in ("epochs", "batch_size"):
            if int(o[key]) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {o[key]}")
        if o.get("workers", 0) < 0:
            raise ConfigError(f"--workers must be >= 0, got {o['workers']}")
        if o["resolution"] is not None and int(o["resolution"]) < 16:
            raise ConfigError(f"--resolution must be >= 16 pixels, got {o['resolution']}")
        self.precision = resolve_precision(o.get("precision_train") or "auto", self.device)

    def _write_config(self) -> None:
        atomic_write_text(self.rundir.config, yaml.safe_dump(
            {k: self.opts[k] for k in _RUN_OPTIONS}, sort_keys=False))

    def _run(self) -> RunResult:
        resume = self._prepare_data()
        self._load_backbone()
        # A resumed run keeps its decision: the domain is not measured again.
        self.decision = (self._decide(self.loaded) if resume is None
                         else StrategyDecision.from_dict(resume[0]["strategy"]))
        log.info("strategy: %s", self.decision.reason)
        if self.on_decision is not None and self.dist.is_main:
            self.on_decision(self.decision)
        _check_batchnorm_batch(self.loaded.model, int(self.opts["batch_size"]), self.decision.strategy)
        self._start_run_dir()
        self._build_network()
        self._choose_conv_dtypes(resume[0] if resume is not None else None)
        self.probe = resume[0].get("linear_probe") if resume is not None else self._linear_probe()
        train_loader, val_loader, forward = self._loaders()
        trainer = self._trainer_ref = self._trainer(forward, steps_per_epoch=len(train_loader))
        if resume is not None:
            state = self._restore(trainer, *resume)
            self.resumed_from = state.epoch
        else:
            state = self._probe_as_epoch_zero(trainer, val_loader)
        state = self._fit(trainer, train_loader, val_loader, state)
        return self._finish(trainer, state, val_loader)

    def _prepare_data(self) -> tuple[dict[str, Any], Any, Any] | None:
        """Resolve the resolution, scan and split the dataset; for --resume, load the last checkpoint."""
        o = self.opts
        card = self.card = get_card(o["model"])
        res = int(o["resolution"] or card.resolution)
        if card.family not in ("vit", "maxvit") and res < card.min_size[0]:
            raise ConfigError(
                f"{card.name} needs inputs of at least {card.min_size[0]} px; --resolution {res} is too small"
            )
        o["resolution"] = res
        splits = self.splits = D.scan_dataset(
            o["data"], o["val_split"], o["test_split"], int(o["seed"]), o["on_bad_image"]
        )
        self.classes = splits.classes
        self.digest = _splits_digest(splits)
        if not self.resume:
            return None
        last = ckpt.load_last(self.run_dir)
        if last[0].get("splits_digest") != self.digest:
            raise CheckpointError(
                f"the dataset {o['data']} changed since {self.run_dir} was started (files or classes differ); "
                "start it over with --restart, or start a new run in another --out"
            )
        return last

    def _load_backbone(self) -> None:
        o, main = self.opts, self.dist.is_main
        if self.dist.enabled and not main:
            barrier(self.dist)  # rank 0 fetches the weights (if they must be downloaded) before the others read them
        self.loaded = load_model(self.card, o["weights"], o["weights_dir"], resolution=o["resolution"],
                                 progress=self.progress)
        if self.dist.enabled and main:
            barrier(self.dist)
        _refuse_nonfinite(self.loaded.model.state_dict(), f"the starting weights ({o['weights']})",
                          "pass weights that hold numbers (or --weights none to start from random weights)")
        self.preprocess = self.card.preprocess.at_resolution(o["resolution"])
        self.eval_tf = D.build_transform(self.card.preprocess, o["resolution"], train=False)

    def _start_run_dir(self) -> None:
        _default_augment(self.opts, self.decision.strategy)
        if self.dist.is_main and not self.resume:
            if self.restart and self.run_dir.is_dir():
                removed = self.rundir.clear()
                if removed:
                    log.warning("removed the earlier run in %s (%d files) to start over", self.run_dir, len(removed))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.rundir.splits, _splits_json(self.splits))  # first: it marks the folder as a run
            self._write_config()

    def _build_network(self) -> None:
        net = self.net = self.loaded.model
        torch.manual_seed(int(self.opts["seed"]))
        replace_head(net, self.card, len(self.classes))
        self.plan = apply_strategy(net, self.card, self.decision)
        net.to(self.device)
        if self.precision.channels_last:
            net.to(memory_format=torch.channels_last)
        self.use_cache = self._use_feature_cache(self.opts["resolution"])

    def _choose_conv_dtypes(self, resumed: dict[str, Any] | None) -> None:
        """Time which trainable grouped convolutions train faster in fp32 (rank 0's choice holds on every rank;
        a resumed run keeps its own)."""
        if self.use_cache:
            return
        if resumed is not None and "fp32_convs" in resumed:
            self.precision = with_fp32_convs(self.precision, resumed["fp32_convs"],
                                             len(trainable_grouped_convs(self.net)), kept=True)
            return
        o = self.opts
        self.precision = choose_fp32_convs(self.net, self.precision, int(o["resolution"]), int(o["batch_size"]),
                                           self.device)
        if self.dist.enabled:
            names = sorted(trainable_grouped_convs(self.net))
            mask = broadcast_mask(self.dist, [n in self.precision.fp32_convs for n in names], self.device)
            chosen = tuple(n for n, c in zip(names, mask, strict=True) if c)
            self.precision = replace(self.precision, fp32_convs=chosen)

    def _linear_probe(self) -> dict[str, Any] | None:
        """lp-ft's first phase: the new head trained on cached features until the validation loss plateaus."""
        if self.decision.strategy != "lp-ft":
            return None
        o, head_path = self.opts, self.card.head_path
        res = int(o["resolution"])
        if not head_is_output(self.net, head_path, torch.zeros(1, 3, res, res, device=self.device)):
            log.warning("lp-ft: %s's head is not its last layer, so its features cannot be cached; the probe phase "
                        "is left out (this run is partial fine-tuning)", self.card.name)
            return None
        train_cache = self._features(self.splits.train, "train")
        val_cache = self._features(self.splits.val, "val")
        bs = int(o["batch_size"])
        sampler = self._train_sampler(len(train_cache), train_cache.labels.tolist(), distributed=False)
        result = fit_probe(
            self.net.get_submodule(head_path), FeatureBatches(train_cache, bs, sampler),
            FeatureBatches(val_cache, bs) if val_cache is not None else None, lr=float(o["lr"]),
            weight_decay=float(o["weight_decay"]), label_smoothing=float(o["label_smoothing"]), device=self.device,
            num_classes=len(self.classes), seed=int(o["seed"]),
        )
        return result.to_dict()

    def _probe_as_epoch_zero(self, trainer: Any, val_loader: Any) -> FitState | None:
        """lp-ft: the probed model is the first candidate for the best epoch (epoch 0), so the fine-tuning phase
        replaces it only with an epoch that does better on validation, and lp-ft never ships less than its
        own probe."""
        if self.probe is None or val_loader is None:
            return None
        val = trainer.last_eval = trainer.evaluate(val_loader)
        record = {"epoch": 0, "phase": "linear probe", "val_loss": val.loss, "val_accuracy": val.accuracy}
        state = FitState(best_accuracy=val.accuracy, best_loss=val.loss, best_epoch=0)
        self._on_best(0, record)
        log.info("lp-ft: the probed model scores %.3f on validation (epoch 0)", val.accuracy)
        return state

    def _fit(self, trainer: Any, train_loader: Any, val_loader: Any, state: Any) -> Any:
        try:
            try:
                return trainer.fit(train_loader, val_loader, state)
            finally:
                self._flush()  # keep the last finished epoch, whatever stopped the run
        except TrainingInterrupted as exc:
            done = exc.epochs_done
            hint = (
                f"epoch {done} is saved in {self.run_dir}; resume with "
                f"`edgetl finetune --out {self.run_dir} --resume` (Python: finetune(out=..., resume=True))"
                if done else f"no epoch finished, so nothing was saved; start the run again (out={self.run_dir})"
            )
            raise TrainingInterrupted(done, int(self.opts["epochs"]), hint) from exc

    def _diverged_hint(self) -> str:
        """How to get past a non-finite loss, and what the run folder still holds."""
        o = self.opts
        fix = f"lower --lr (it is {o['lr']:g})"
        if self.precision.autocast_dtype is not None:
            fix += " or train in fp32 (--precision-train fp32)"
        last = self.rundir.read_last()["epoch"] if self.rundir.can_resume() else 0
        kept = f"epoch {last} is kept in {self.run_dir}; " if last else "no epoch finished, so nothing was saved; "
        return f"{kept}{fix} and start over with `edgetl finetune ... --out {self.run_dir} --restart`"

    def _decide(self, loaded: Any) -> StrategyDecision:
        o = self.opts
        domain = self._domain(loaded) if o["strategy"] == "auto" else None
        args = (o["strategy"], len(self.card.block_paths), len(self.splits.train), len(self.classes), domain,
                o["unfreeze"])
        table = choose_strategy(*args)
        if o["strategy"] != "auto":
            return table
        plan = plan_trials(len(self.splits.train), len(self.splits.val), int(o["epochs"]), loaded.pretrained,
                           self.dist.enabled)
        log.info("auto: %s; %s", table.reason, "trying " + ", ".join(plan.candidates) if plan.candidates
                 else f"no trials: {plan.reason}")
        trials = tuple(self._trial(strategy, plan.epochs) for strategy in plan.candidates)
        return choose_strategy(*args, trials=TrialReport.of(plan, table.strategy, trials))

    def _domain(self, loaded: Any) -> DomainEstimate:
        """How similar the images are to ImageNet (for auto): given, measured, or 'different' without weights."""
        o = self.opts
        if not loaded.pretrained:
            # random weights hold nothing to transfer, whatever the images are like
            if o["domain"] == "similar":
                log.warning("--domain similar is ignored without pretrained weights: the domain counts as different")
            return estimate_domain("auto", None)
        if o["domain"] == "auto" and loaded.imagenet_head:
            records = list(self.splits.train)
            random.Random(int(o["seed"])).shuffle(records)
            sample = records[:DOMAIN_SAMPLE_IMAGES]
            loader = D.make_loader(sample, self.eval_tf, int(o["batch_size"]), shuffle=False,
                                   num_workers=int(o["workers"]), device=self.device, seed=int(o["seed"]))
            loaded.model.to(self.device)
            return estimate_domain("auto", loaded.model, loader, self.device)
        # given by the user, or auto with a head that cannot measure it
        return estimate_domain(o["domain"], loaded.model, imagenet_head=bool(loaded.imagenet_head))

    def _trial(self, strategy: str, epochs: int) -> Trial:
        """One of auto's trials: ``strategy`` trained on the training split and scored on the validation split."""
        decision = choose_strategy(strategy, len(self.card.block_paths), unfreeze=self.opts["unfreeze"])
        try:
            trial = _Trial(self, decision, epochs).score()
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(0, int(self.opts["epochs"]), (
                f"interrupted in auto's {strategy} trial, before the run started, so nothing was saved; start it "
                "again (or give --strategy, which runs no trials)")) from exc
        except TrainingError as exc:  # a candidate that diverges loses; the others still compete
            log.warning("auto: the %s trial failed (%s); it is out of the running", strategy, exc)
            return Trial(strategy, exc.epoch or 0, 0, 0.0, None, failed=str(exc))
        log.info("auto: trial %s scored %.3f on validation (epoch %d of %d)", strategy, trial.val_accuracy,
                 trial.best_epoch, trial.epochs)
        return trial

    def _use_feature_cache(self, res: int) -> bool:
        o = self.opts
        wanted = o["feature_cache"]
        reasons = []
        if self.decision.strategy != "linear":
            reasons.append(f"the strategy is {self.decision.strategy}, not linear")
        if o["augment"] != "none":
            reasons.append(f"augmentation is {o['augment']}")
        if not reasons and self.dist.enabled:
            # under torchrun every rank gathers all features in memory (the disk spill is single-process)
            head = self.net.get_submodule(self.card.head_path)
            dim = getattr(head, "in_features", None) or getattr(head, "in_channels", None)
            images = len(self.splits.train) + len(self.splits.val) + len(self.splits.test)
            mb = (dim or 0) * 4 * images / 2**20
            if mb > DEFAULT_MAX_MEMORY_MB:
                reasons.append(f"its features would take {mb:.0f} MB in memory on every rank "
                               f"(over {DEFAULT_MAX_MEMORY_MB} MB)")
        if not reasons:
            example = torch.zeros(1, 3, res, res, device=self.device)
            if not head_is_output(self.net, self.card.head_path, example):
                reasons.append(f"{self.card.name}'s head is not its last layer")
        if reasons:
            if wanted and o["strategy"] == "auto" and self.decision.strategy != "linear":
                log.info("%sfeature cache not used: the strategy is %s, and the cache serves the linear probe only",
                         self.label, self.decision.strategy)
                return False
            if wanted:
                raise ConfigError(
                    f"the feature cache cannot be used: {'; '.join(reasons)} (it needs the linear strategy, no "
                    "augmentation and a head that is the last layer)"
                )
            if self.decision.strategy == "linear":
                log.info("linear probe without feature cache: %s", "; ".join(reasons))
            return False
        return wanted is None or bool(wanted)

    def _train_sampler(self, size: int, labels: list[int], distributed: bool) -> Any:
        o = self.opts
        weights = None
        if o["balance"]:
            counts = Counter(labels)
            weights = [1.0 / counts[y] for y in labels]
        if distributed and self.dist.enabled and weights is None:

            return DistributedSampler(range(size), num_replicas=self.dist.world_size, rank=self.dist.rank,
                                      shuffle=True, seed=int(o["seed"]))
        world = self.dist.world_size if distributed else 1
        rank = self.dist.rank if distributed else 0
        return EpochSampler(size, int(o["seed"]), weights, world, rank)

    def _image_loader(self, records: list, pipeline: tuple[Any, Any], sampler: Any, drop_last: bool = False,
                      cache: bool = True) -> Any:
        o = self.opts
        prepare, transform = pipeline
        return D.make_loader(
            records, transform, int(o["batch_size"]), shuffle=False, num_workers=int(o["workers"]),
            device=self.device, sampler=sampler, seed=int(o["seed"]), on_bad_image=o["on_bad_image"],
            drop_last=drop_last, skipped=self.splits.skipped, prepare=prepare,
            store=self._image_store(records, prepare) if cache else None,
        )

    def _image_store(self, records: list, prepare: Any) -> Any:
        """The records decoded once, when --image-cache says so or they fit the memory budget; else None."""
        wanted = self.opts.get("image_cache")
        if wanted is False or (wanted is None and self.dist.enabled):  # each rank would hold every image
            return None
        need = D.estimate_bytes(records, prepare.stored_shape)
        if wanted is None and need > self._cache_budget:
            log.info("images are decoded every epoch: %.0f MB decoded > %.0f MB budget (a quarter of the free RAM)",
                     need / 2**20, self._cache_budget / 2**20)
            return None
        self._cache_budget -= need
        self.image_cache = True
        return D.DecodedStore.build(records, prepare)

    def _eval_loader(self, records: list, cache: bool = True) -> Any:
        if not records:
            return None
        sampler = ShardSampler(len(records), self.dist.world_size, self.dist.rank) if self.dist.enabled else None
        pipeline = D.build_tensor_pipeline(self.card.preprocess, self.opts["resolution"], train=False)
        return self._image_loader(records, pipeline, sampler, cache=cache)

    def _features(self, records: list, name: str) -> Any:
        loader = self._eval_loader(records, cache=False)  # read once: nothing to gain from keeping the images
        if loader is None:
            return None

        t0 = time.perf_counter()
        with ProgressDisplay(self.progress and self.dist.is_main) as bar:
            bar.start(f"caching {name} features", len(loader))
            cache = extract_features(
                self.net, self.card.head_path, loader, self.device,
                amp_dtype=self.precision.autocast_dtype, channels_last=self.precision.channels_last,
                disk_dir=self.rundir.feature_cache, name=name, dist=self.dist,
                progress=lambda _done: bar.update(),
            )
        log.info("cached %d %s features of size %d in %.1f s", len(cache), name, cache.dim, time.perf_counter() - t0)
        return cache

    def _loaders(self) -> tuple[Any, Any, Any]:
        o = self.opts
        self._cache_budget, self.image_cache = D.memory_budget(), False
        bs = int(o["batch_size"])
        labels = [y for _, y in self.splits.train]
        if self.use_cache:
            train_cache = self._features(self.splits.train, "train")
            self.val_cache = self._features(self.splits.val, "val")
            sampler = self._train_sampler(len(train_cache), train_cache.labels.tolist(), distributed=False)
            train = FeatureBatches(train_cache, bs, sampler)
            val = FeatureBatches(self.val_cache, bs) if self.val_cache is not None else None
            return train, val, self.net.get_submodule(self.card.head_path)
        pipeline = D.build_tensor_pipeline(self.card.preprocess, o["resolution"], train=True, augment=o["augment"])
        sampler = self._train_sampler(len(self.splits.train), labels, distributed=True)
        # A last batch of one image breaks BatchNorm in training mode: drop it in that case only.
        drop_last = len(sampler) % bs == 1 and self.decision.strategy != "linear"
        train = self._image_loader(self.splits.train, pipeline, sampler, drop_last=drop_last)
        val = self._eval_loader(self.splits.val)
        forward = self.net
        if self.dist.enabled:

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(self.net, device_ids=ids)
        return train, val, forward

    def _trainer(self, forward: Any, steps_per_epoch: int) -> Any:
        o = self.opts
        # lp-ft fine-tunes from the probed head at FT_LR_SCALE x --lr (measured: see edgetl.finetune.lpft)
        lr = float(o["lr"]) * (FT_LR_SCALE if self.decision.strategy == "lp-ft" else 1.0)
        config = TrainConfig(
            epochs=int(o["epochs"]), lr=lr, layer_decay=float(o["layer_decay"]),
            weight_decay=float(o["weight_decay"]), warmup_epochs=float(o["warmup_epochs"]),
            patience=o["patience"], label_smoothing=float(o["label_smoothing"]), seed=int(o["seed"]),
            deterministic=bool(o["deterministic"]), progress=self.progress and self.dist.is_main,
            precision=self.precision, label=self.label,
        )
        config.validate()
        # The lower stages' smaller LR protects pretrained features; random weights have none to protect.
        decay = config.layer_decay if self.loaded.pretrained else 1.0
        groups = build_param_groups(self.net, self.plan, self.card, config.lr, decay, config.weight_decay)
        self.param_groups = describe_param_groups(groups)
        # Fused AdamW: one kernel per parameter. On the CPU (torch >= 2.4) it is elementwise and deterministic,
        # and the default there is a Python loop of about ten ops per parameter.
        fused = self.device.type == "cpu" or (self.device.type == "cuda" and not config.deterministic)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)
        scheduler = make_scheduler(optimizer, steps_per_epoch, config.epochs, config.warmup_epochs)
        # The cached probe trains the same head on the same features on every rank: no reductions.
        dist = DistInfo() if self.use_cache else self.dist
        return Trainer(
            self.net, optimizer, scheduler, config, self.device, len(self.classes), forward_module=forward,
            dist=dist, on_best=self._on_best, on_epoch_end=self._on_epoch_end, callbacks=self.callbacks,
        )

    # -- checkpoints --

    def _meta(self) -> dict[str, Any]:
        o = self.opts
        try:
            edgetl_version = version("edgetl")
        except PackageNotFoundError:  # running from a source tree
            edgetl_version = "unknown"

        return {
            "edgetl_version": edgetl_version,
            "torch_version": torch.__version__,
            "torchvision_version": torchvision_version(),
            "model": self.card.id,
            "model_name": self.card.name,
            "family": self.card.family,
            "head_path": self.card.head_path,
            "arch_kwargs": self.loaded.arch_kwargs,
            "weights": self.loaded.describe(),
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "strategy": self.decision.to_dict(),
            "linear_probe": self.probe,
            "resolution": int(o["resolution"]),
            "preprocess": self.preprocess.to_dict(),
            "feature_cache": self.use_cache,
            "fp32_convs": list(self.precision.fp32_convs),
            "world_size": self.dist.world_size,
            "config": {k: o[k] for k in _RUN_OPTIONS},
        }

    def _state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.net.state_dict().items()}

    # Checkpoints are snapshotted in memory after every epoch and written to disk when the last write is
    # at least `checkpoint_interval` seconds old, after the final epoch, and when training stops on an
    # interruption or an error. Epochs of the cached linear probe take milliseconds; writing the whole
    # backbone after each of them would cost more than the training.

    def _on_best(self, epoch: int, record: dict[str, Any]) -> None:
        self.best_state = _snapshot(self._state_dict())
        self.best_val = self._trainer_ref.last_eval
        self._pending_best = {**self._meta(), "epoch": epoch, "epoch_metrics": record}

    def _on_epoch_end(self, state: Any) -> None:
        trainer = self._trainer_ref
        sched = {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            **self._meta(),
            "epoch": state.epoch,
            "splits_digest": self.digest,
            "fit": json.loads(json.dumps(state.to_dict())),
            "scheduler": sched,
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        }
        self._pending_last = (_snapshot(self._state_dict()), _snapshot(trainer.optimizer.state_dict()), meta)
        done = state.epoch >= int(self.opts["epochs"]) or state.stopped_early
        if done or time.monotonic() - self._last_write >= self.checkpoint_interval:
            self._flush()

    def _flush(self) -> None:
        """Write the pending best and last checkpoints (rank 0 only)."""
        if self.dist.is_main:
            if self._pending_best is not None and self.best_state is not None:
                ckpt.save_best(self.run_dir, self.best_state, self._pending_best)
            if self._pending_last is not None:
                ckpt.save_last(self.run_dir, *self._pending_last)
        self._pending_best = self._pending_last = None
        self._last_write = time.monotonic()

    def _restore(self, trainer: Any, meta: dict[str, Any], weights: dict[str, Any], optim: dict[str, Any]) -> Any:
        _refuse_nonfinite(weights, f"{self.run_dir}'s last checkpoint", "start it over with --restart")
        missing, unexpected = self.net.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{self.rundir.last_weights} does not match the model ({len(missing)} missing keys)"
            )
        try:
            trainer.optimizer.load_state_dict(optim)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"the optimizer state in {self.run_dir} does not match the model: {exc}") from exc
        sched = dict(meta["scheduler"])
        sched["lr_lambdas"] = [None] * len(trainer.optimizer.param_groups)
        trainer.scheduler.load_state_dict(sched)
        if trainer.scaler is not None and meta.get("scaler"):
            trainer.scaler.load_state_dict(meta["scaler"])
        state = FitState.from_dict(meta["fit"])
        log.info("resuming %s from epoch %d of %d", self.run_dir, state.epoch, int(self.opts["epochs"]))
        return state

    # -- the end --

    def _finish(self, trainer: Any, state: Any, val_loader: Any) -> RunResult:
        val, test = self._final_evaluation(trainer, val_loader)
        skipped = self._skipped_everywhere()
        metrics = self._metrics(state, val, test, skipped)
        if self.dist.is_main:
            self._write_metrics(state, metrics, test or val)
        barrier(self.dist)
        return RunResult(
            run_dir=self.run_dir,
            checkpoint=self.rundir.weights,
            model=self.card.id,
            classes=self.classes,
            strategy=self.decision,
            val_accuracy=metrics["val_accuracy"],
            test_accuracy=metrics["test_accuracy"],
            best_epoch=state.best_epoch,
            epochs_run=state.epoch,
            stopped_early=state.stopped_early,
            feature_cache=self.use_cache,
            weights=self.loaded.weights,
            skipped=skipped,
            metrics=metrics,
            resumed_from=self.resumed_from,
            seconds=time.perf_counter() - self.start,
        )

    def _final_evaluation(self, trainer: Any, val_loader: Any) -> tuple[Any, Any]:
        """The best weights on the validation and test splits."""
        val = self.best_val
        if self.best_state is None:  # the best epoch came before a resume: read it back
            _, self.best_state = ckpt.load_best(self.run_dir)
            val = None
        self.net.load_state_dict(self.best_state)
        if val is None and val_loader is not None:
            val = trainer.evaluate(val_loader)
        if not self.splits.test:
            return val, None
        if self.use_cache:
            cache = self._features(self.splits.test, "test")
            return val, trainer.evaluate(FeatureBatches(cache, int(self.opts["batch_size"])))
        return val, trainer.evaluate(self._eval_loader(self.splits.test, cache=False))

    def _skipped_everywhere(self) -> list[tuple[str, str]]:
        skipped = [(str(p), r) for p, r in self.splits.skipped]
        if not self.dist.enabled:
            return skipped
        gathered: list[Any] = [None] * self.dist.world_size  # each rank saw only its shard's unreadable files
        torch_dist.all_gather_object(gathered, skipped)
        return sorted({(p, r) for part in gathered for p, r in part})

    def _metrics(self, state: Any, val: Any, test: Any, skipped: list[tuple[str, str]]) -> dict[str, Any]:
        classes, final = self.classes, test or val
        return {
            "model": self.card.id,
            "strategy": self.decision.to_dict(),
            "param_groups": self.param_groups,
            "linear_probe": self.probe,
            "precision_train": self.precision.to_dict(),
            "feature_cache": self.use_cache,
            "image_cache": self.image_cache,
            "world_size": self.dist.world_size,
            "epochs": state.history,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "stopped_early": state.stopped_early,
            "val_accuracy": val.accuracy if val else None,
            "val_accuracy_chose_epoch": val.accuracy if val else None,
            "selection": self._selection(state, val),
            "test_accuracy": test.accuracy if test else None,
            "val": val.to_dict(classes) if val else None,
            "test": test.to_dict(classes) if test else None,
            "per_class_accuracy": final.per_class(classes) if final else None,
            "confusion_matrix": final.confusion if final else None,
            "confusion_split": ("test" if test else "val") if final else None,
            "classes": classes,
            "dataset": self.splits.summary(),
            "skipped_images": len(skipped),
        }

    def _selection(self, state: Any, val: Any) -> dict[str, Any]:
        """What chose the model: the split, its size, what it chose and its (optimistic) accuracy there."""
        chose = ["best epoch", "early stopping"] + (["linear probe's epochs"] if self.probe else [])
        return {
            "split": "val" if val else "train",
            "images": val.images if val else len(self.splits.train),
            "chose": chose,
            "best_epoch": state.best_epoch,
            "accuracy": val.accuracy if val else state.best_accuracy,
            "note": "measured on the images that chose the model, so it is optimistic; the test split, which "
                    "chose nothing, reports it",
        }

    def _write_metrics(self, state: Any, metrics: dict[str, Any], final: Any) -> None:
        from edgetl.plots import plot_confusion_matrix, plot_training_curves  # deferred: matplotlib is heavy

        atomic_write_json(self.rundir.metrics, metrics)
        plot_training_curves(state.history, self.rundir.curves)
        if final is not None:
            title = f"confusion matrix ({metrics['confusion_split']}, epoch {state.best_epoch})"
            plot_confusion_matrix(final.confusion, self.classes, self.rundir.confusion, title=title)
        summary = {k: metrics[k] for k in ("val_accuracy", "val_accuracy_chose_epoch", "selection", "test_accuracy",
                                            "test", "best_epoch", "epochs_run", "per_class_accuracy",
                                            "confusion_matrix", "confusion_split")}
        ckpt.update_best_meta(self.run_dir, final_metrics=summary, history=state.history)


def _default_augment(opts: dict[str, Any], strategy: str) -> None:
    """Fill in --augment's default: none for the linear probe (so its features can be cached), light otherwise."""
    if opts["augment"] is None:
        opts["augment"] = "none" if strategy == "linear" else "light"


class _Trial(_Run):
    """One of auto's trials: the run's own training code on a copy of the pretrained model, with the training and
    validation splits only (the test split is not handed to it), no user callbacks, and nothing written."""

    def __init__(self, run: _Run, decision: StrategyDecision, epochs: int):
        opts = {**run.opts, "epochs": epochs}
        super().__init__(run.run_dir, opts, False, run.progress, (), None, run.checkpoint_interval)
        self.device, self.dist, self.precision = run.device, run.dist, run.precision
        self.card, self.classes, self.preprocess = run.card, run.classes, run.preprocess
        self.splits = replace(run.splits, test=[], skipped=list(run.splits.skipped))
        self.loaded = replace(run.loaded, model=copy.deepcopy(run.loaded.model))
        self.decision = decision
        self.label = f"trial {decision.strategy}: "
        _default_augment(self.opts, decision.strategy)

    def score(self) -> Trial:
        """Train, and return the best validation epoch."""
        self._build_network()
        self.probe = self._linear_probe()
        train_loader, val_loader, forward = self._loaders()
        trainer = self._trainer_ref = self._trainer(forward, steps_per_epoch=len(train_loader))
        state = trainer.fit(train_loader, val_loader, self._probe_as_epoch_zero(trainer, val_loader))
        return Trial(self.decision.strategy, state.epoch, state.best_epoch, state.best_accuracy, state.best_loss,
                     self.probe["epochs"] if self.probe else None)

    def _on_best(self, epoch: int, record: dict[str, Any]) -> None:
        pass  # a trial keeps no weights: only its score

    def _on_epoch_end(self, state: Any) -> None:
        pass  # nor checkpoints


def _refuse_nonfinite(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse weights holding a NaN or an infinity, naming the first such tensor."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        name, nans, infs = bad
        raise WeightsError(
            f"{what} hold non-finite values in {name} ({nans} NaN, {infs} infinite of "
            f"{tensors[name].numel()}): training from them gives a NaN loss; {fix}"
        )


def _snapshot(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to the CPU."""

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _splits_json(splits: Any) -> dict[str, Any]:
    return {
        "format": RUN_SPLITS_FORMAT,
        "classes": list(splits.classes),
        "source": splits.source,
        "test_split": splits.test_choice.to_dict() if splits.test_choice is not None else None,
        **{name: [[str(p), int(y)] for p, y in getattr(splits, name)] for name in ("train", "val", "test")},
        "skipped": [[str(p), r] for p, r in splits.skipped],
    }
