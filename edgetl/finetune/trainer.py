"""The training loop: ``fit`` / ``train_one_epoch`` / ``evaluate``.

- Device auto-detection; mixed precision and channels-last as :mod:`edgetl.finetune.precision` decides
  (bf16 on CPUs and GPUs that compute it natively, fp16 with a GradScaler on other GPUs, else fp32).
- AdamW with per-step linear warm-up and cosine decay (:func:`make_scheduler`).
- Each epoch's randomness (data order, augmentation, dropout) is reseeded from ``(seed, epoch)``,
  so a run resumed at an epoch boundary computes exactly what the uninterrupted run would have.
- Early stopping on validation accuracy; the best weights are checkpointed as they appear.
- SIGINT: the current step finishes, the last finished epoch's checkpoint is on disk, and
  :class:`~edgetl.errors.TrainingInterrupted` (exit code 130) says how to resume. A second
  Ctrl-C stops at once.
- A NaN guard: a non-finite training loss stops the run with :class:`~edgetl.errors.TrainingError`, naming
  the epoch and step, before that epoch reaches a checkpoint. Each step folds ``isfinite(loss)`` into a
  flag on the device; the flag is read every step on the CPU and every :data:`NONFINITE_CHECK_EVERY` steps
  (and at each epoch's end) on a GPU, so a GPU run does not wait on the host each step. Under torchrun the
  flag is reduced over ranks, so every rank stops at the same step.
- Under torchrun the model is wrapped in DistributedDataParallel by the caller; metrics are reduced
  across ranks and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgetl.errors import BackendUnavailableError, ConfigError, TrainingError, TrainingInterrupted
from edgetl.finetune.distributed import DistInfo, all_reduce_min, all_reduce_sum, broadcast_flag
from edgetl.finetune.metrics import EvalResult
from edgetl.finetune.precision import TrainPrecision, resolve_precision

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]

# On a GPU the non-finite-loss flag is read (a host sync) every this many steps, and at each epoch's end.
NONFINITE_CHECK_EVERY = 25
_NO_STEP = 2**62  # the flag's value while every loss was finite


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """The first floating-point tensor holding a NaN or an infinity.

    Args:
        tensors: named tensors (a ``state_dict``).

    Returns:
        ``(name, NaN count, infinity count)`` of the first such tensor, or None when all are finite.
    """
    import torch  # deferred: heavy

    for name, t in tensors.items():
        if not (torch.is_floating_point(t) or torch.is_complex(t)):
            continue
        if not bool(torch.isfinite(t).all()):
            return name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return None


@dataclass
class TrainConfig:
    """Options of the training loop (the strategy and data options live in the API).

    Attributes:
        epochs: maximum number of epochs.
        lr: the head's peak learning rate.
        layer_decay: LR multiplier from one trainable block to the one below it.
        weight_decay: AdamW weight decay (never applied to norms, biases and embeddings).
        warmup_epochs: linear warm-up length, in epochs (capped at a fifth of the run).
        patience: stop after this many epochs without a better validation accuracy (None or 0: never).
        label_smoothing: cross-entropy label smoothing.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        precision: the training arithmetic (None: ``auto`` for the device, see
            :func:`~edgetl.finetune.precision.resolve_precision`).
        seed: the run's seed.
        deterministic: use deterministic algorithms only (slower on GPU).
        progress: show rich progress bars on stderr.
        label: what the progress bars say before ``epoch k/N`` (auto's trials name themselves there).
    """

    epochs: int = 10
    lr: float = 1e-3
    layer_decay: float = 0.7
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int | None = 5
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    precision: TrainPrecision | None = None
    seed: int = 0
    deterministic: bool = False
    progress: bool = True
    label: str = ""

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"--patience must be >= 0 (0 turns early stopping off), got {self.patience}")


@dataclass
class FitState:
    """What the loop carries from epoch to epoch, saved in ``last.json`` for resuming."""

    epoch: int = 0
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_accuracy": self.best_accuracy,
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitState:
        d = dict(d)
        d["best_loss"] = math.inf if d.get("best_loss") is None else d["best_loss"]
        return cls(**d)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else the CPU; ``cuda`` without CUDA is an error."""
    import torch  # deferred: heavy

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally switch torch to deterministic algorithms."""
    import torch  # deferred: heavy

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness."""
    return (seed * 100_003 + epoch * 7_919 + 1) % 2**63


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float):
    """Per-step LR schedule: linear warm-up, then cosine decay to 0 at the last step."""
    import torch  # deferred: heavy

    total = max(1, steps_per_epoch * epochs)
    warmup = min(max(0, round(warmup_epochs * steps_per_epoch)), total // 5)
    fn = functools.partial(_warmup_cosine, warmup=warmup, total=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class _Interrupted(Exception):
    pass


class _SigintGuard:
    """First SIGINT or SIGTERM sets a flag (checked between steps); a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.flag = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        log.warning("interrupt: finishing the current step and stopping (Ctrl-C again to stop at once)")

    def __enter__(self) -> _SigintGuard:
        if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, a scheduler) as Ctrl-C
            self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, handler)


class ProgressDisplay:
    """Progress on stderr: rich bars on a terminal; elsewhere (a log file, a pipe, CI) one plain line per finished
    task, which no terminal width can cut. A no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._plain: dict[str, Any] | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.enabled and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, description: str, total: int) -> None:
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=total, stats="")
        elif self.enabled:
            self._plain = {"description": description, "total": total, "done": 0, "start": time.perf_counter()}

    def update(self, advance: int = 1, **stats: Any) -> None:
        text = "  ".join(f"{k} {v}" for k, v in stats.items())
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=advance, **({"stats": text} if stats else {}))
        elif self._plain is not None:
            task = self._plain
            task["done"] += advance
            task["stats"] = text or task.get("stats", "")
            if task["done"] >= task["total"]:
                line = f"{task['description']}: {task['stats']}  ({time.perf_counter() - task['start']:.0f} s)"
                print(line, file=sys.stderr, flush=True)
                self._plain = None


class Trainer:
    """Trains a classifier: ``fit`` runs epochs of ``train_one_epoch`` and ``evaluate``.

    Args:
        model: the whole network (what checkpoints save).
        optimizer: an optimizer over the trainable parameters.
        scheduler: a per-step LR scheduler.
        config: loop options.
        device: where to train.
        num_classes: number of classes (for the confusion matrix).
        forward_module: the module batches go through; default ``model``. The feature-cache probe
            passes the head (batches are features), DDP passes the DistributedDataParallel wrapper.
        dist: this process's place in a distributed run.
        on_best: called with ``(epoch, record)`` when validation accuracy improves (save the best).
        on_epoch_end: called with ``(state)`` after each epoch, after ``on_best`` (checkpoint it here).
        callbacks: called with ``(epoch, record)`` after each epoch, after the checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        config: TrainConfig,
        device: torch.device,
        num_classes: int,
        forward_module: nn.Module | None = None,
        dist: DistInfo | None = None,
        on_best: EpochCallback | None = None,
        on_epoch_end: Callable[[FitState], None] | None = None,
        callbacks: tuple[EpochCallback, ...] = (),
    ) -> None:
        import torch  # deferred: heavy

        self.model = model
        self.forward_module = forward_module if forward_module is not None else model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.device = device
        self.num_classes = num_classes
        self.dist = dist or DistInfo()
        self.on_best = on_best
        self.on_epoch_end = on_epoch_end
        self.callbacks = callbacks
        self.precision = config.precision or resolve_precision("auto", device)
        self.amp_dtype = self.precision.autocast_dtype
        self.scaler = torch.amp.GradScaler(device.type) if self.precision.grad_scaler else None
        self.channels_last = self.precision.channels_last
        self._fp32_weights = [model.get_submodule(name).weight for name in self.precision.fp32_convs]
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.last_eval: EvalResult | None = None
        self._guard: _SigintGuard | None = None
        self._progress = ProgressDisplay(False)

    # --- steps -----------------------------------------------------------------------------------

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # deferred: heavy

        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch  # deferred: heavy

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for a training step: the precision's fp32 convolutions run in fp32 inside it."""
        if not self._fp32_weights:
            return self._autocast()
        from edgetl.finetune.conv_dtype import Fp32Convs  # deferred: it imports torch

        stack = contextlib.ExitStack()
        stack.enter_context(self._autocast())
        stack.enter_context(Fp32Convs(self._fp32_weights))
        return stack

    def _interrupted(self) -> bool:
        local = self._guard is not None and self._guard.flag
        return broadcast_flag(self.dist, local, self.device) if self.dist.enabled else local

    def train_one_epoch(self, loader: Any, epoch: int = 0) -> dict[str, float]:
        """Train for one pass over ``loader``; return loss, accuracy, images and images/s (this rank's view
        reduced over all ranks)."""
        import torch  # deferred: heavy

        self.forward_module.train()
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bad_step = torch.full((), _NO_STEP, dtype=torch.long, device=self.device)  # the first non-finite loss
        seen = 0
        start = time.perf_counter()
        self._progress.start(f"{self.config.label}epoch {epoch + 1}/{self.config.epochs}", len(loader))
        for step, (images, labels) in enumerate(loader):
            images, labels = self._to_device(images, labels)
            with self._train_autocast():
                logits = self.forward_module(images)
                loss = self.criterion(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if self.config.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self._params(), self.config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self._params(), self.config.grad_clip)
                self.optimizer.step()
            self.scheduler.step()
            bad_step = torch.where(torch.isfinite(loss.detach()) | (bad_step < _NO_STEP), bad_step, step)
            if self.device.type != "cuda" or (step + 1) % NONFINITE_CHECK_EVERY == 0 or step == len(loader) - 1:
                self._stop_if_nonfinite(bad_step, epoch, len(loader))
            n = labels.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == labels).sum()
            if self._progress.enabled and (step % 5 == 0 or step == len(loader) - 1):
                elapsed = time.perf_counter() - start
                self._progress.update(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                )
            else:
                self._progress.update()
            if self._interrupted():
                raise _Interrupted
        elapsed = time.perf_counter() - start
        totals = torch.tensor([loss_sum.item(), float(correct.item()), float(seen)], dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        all_reduce_sum(self.dist, totals)
        loss_total, correct_total, seen_total = totals.tolist()
        return {
            "train_loss": loss_total / max(1, seen_total),
            "train_accuracy": correct_total / max(1, seen_total),
            "train_images": int(seen_total),
            "seconds": elapsed,
            "images_per_s": seen_total / max(elapsed, 1e-9),
        }

    def _stop_if_nonfinite(self, bad_step: torch.Tensor, epoch: int, steps: int) -> None:
        """Raise TrainingError if a step's loss was NaN or infinite on any rank (the earliest such step)."""
        first = all_reduce_min(self.dist, bad_step.clone()) if self.dist.enabled else bad_step
        step = int(first.item())
        if step < _NO_STEP:
            raise TrainingError(
                f"the training loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} of {steps}",
                epoch=epoch + 1, step=step + 1,
            )

    def _params(self) -> Iterator[torch.nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def evaluate(self, loader: Any, module: nn.Module | None = None) -> EvalResult:
        """Evaluate on ``loader``: mean loss and the confusion matrix (reduced over ranks).

        Args:
            loader: batches of ``(inputs, labels)``; under DDP, each rank's shard.
            module: the module to run (default: the forward module, unwrapped from DDP).
        """
        import torch  # deferred: heavy

        module = module or getattr(self.forward_module, "module", self.forward_module)
        was_training = module.training
        module.eval()
        k = self.num_classes
        confusion = torch.zeros(k * k, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        with torch.inference_mode():
            for images, labels in loader:
                images, labels = self._to_device(images, labels)
                with self._autocast():
                    logits = module(images)
                loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
                pred = logits.argmax(1)
                confusion += torch.bincount(labels * k + pred, minlength=k * k)
                seen += labels.shape[0]
        module.train(was_training)
        comm = "cuda" if self.device.type == "cuda" else "cpu"
        totals = torch.cat([confusion.double(), loss_sum.view(1), torch.tensor([float(seen)], dtype=torch.float64,
                                                                                 device=self.device)]).to(comm)
        all_reduce_sum(self.dist, totals)
        matrix = totals[: k * k].round().long().view(k, k).tolist()
        images_total = int(totals[-1].item())
        return EvalResult(loss=totals[-2].item() / max(1, images_total), confusion=matrix, images=images_total)

    # --- epochs ----------------------------------------------------------------------------------

    def _seed_epoch(self, epoch: int, loader: Any) -> None:
        import torch  # deferred: heavy

        s = epoch_seed(self.config.seed, epoch)
        # Augmentation is seeded per image (ImageDataset.set_epoch); this global seed drives dropout, which
        # each rank draws on its own, still as a function of seed, epoch and rank so a resumed run draws
        # the same. The shuffling generator below stays shared, as the shards need.
        r = s + 1_000_003 * self.dist.rank if self.dist.enabled else s
        random.seed(r)
        np.random.seed(r % 2**32)
        torch.manual_seed(r)
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if hasattr(getattr(batch_sampler, "sampler", None), "set_epoch"):
            batch_sampler.sampler.set_epoch(epoch)
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(s)

    def fit(self, train_loader: Any, val_loader: Any = None, state: FitState | None = None) -> FitState:
        """Train from ``state.epoch`` to ``config.epochs``, with early stopping on validation accuracy.

        Returns:
            The final state (history, best epoch and accuracy, whether it stopped early).

        Raises:
            TrainingInterrupted: on SIGINT or KeyboardInterrupt; the last finished epoch is saved.
        """
        cfg = self.config
        state = state or FitState()
        with _SigintGuard() as guard, ProgressDisplay(cfg.progress and self.dist.is_main) as progress:
            self._guard, self._progress = guard, progress
            try:
                while state.epoch < cfg.epochs and not state.stopped_early:
                    epoch = state.epoch
                    self._seed_epoch(epoch, train_loader)
                    record: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                    record.update(self.train_one_epoch(train_loader, epoch))
                    if val_loader is not None:
                        val = self.last_eval = self.evaluate(val_loader)
                        record.update(val_loss=val.loss, val_accuracy=val.accuracy)
                        better = val.accuracy > state.best_accuracy or (
                            val.accuracy == state.best_accuracy and val.loss < state.best_loss
                        )
                    else:
                        better = True
                    state.history.append(record)
                    state.epoch = epoch + 1
                    if better:
                        state.best_accuracy = record.get("val_accuracy", record["train_accuracy"])
                        state.best_loss = record.get("val_loss", record["train_loss"])
                        state.best_epoch = epoch + 1
                        state.bad_epochs = 0
                        if self.on_best is not None:
                            self.on_best(epoch + 1, record)
                    else:
                        state.bad_epochs += 1
                        # patience running out on the last epoch stops nothing: every epoch asked for ran
                        if cfg.patience and state.bad_epochs >= cfg.patience and state.epoch < cfg.epochs:
                            state.stopped_early = True
                            log.info("early stop: no better validation accuracy for %d epochs", cfg.patience)
                    log.info(
                        "epoch %d/%d: loss %.4f acc %.3f val_acc %s (%.0f img/s)",
                        epoch + 1, cfg.epochs, record["train_loss"], record["train_accuracy"],
                        f"{record['val_accuracy']:.3f}" if "val_accuracy" in record else "-", record["images_per_s"],
                    )
                    if self.on_epoch_end is not None:
                        self.on_epoch_end(state)
                    for callback in self.callbacks:
                        callback(epoch + 1, record)
                    if self._interrupted():
                        raise _Interrupted
            except (_Interrupted, KeyboardInterrupt) as exc:
                raise TrainingInterrupted(state.epoch, cfg.epochs) from exc
            finally:
                self._guard, self._progress = None, ProgressDisplay(False)
        return state
