"""``--strategy lp-ft``: a linear probe first, then the top blocks fine-tuned from its head.

Kumar et al. ("Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
ICLR 2022) and TensorFlow's MobileNetV2 cats-vs-dogs transfer-learning tutorial train in two phases:

1. **Linear probe.** The backbone is frozen and the new head trains on the backbone's features. Here the
   features are computed once (:mod:`edgetl.finetune.features`), so each epoch costs only the head; it
   runs until the validation loss (the training loss without a validation split) has not improved by
   :data:`MIN_DELTA` for :data:`PATIENCE` epochs, at most :data:`MAX_EPOCHS`, and keeps the best head.
2. **Fine-tuning.** The probed head is scaled back to the weight norm it had when it was made (its logits shrink
   by the same factor: its predictions, and so its accuracy, do not change), and the top blocks are unfrozen, as
   under ``partial``, and train together with it at :data:`FT_LR_SCALE` times ``--lr``, with stage-wise LR decay
   below and the unfrozen blocks' BatchNorm statistics training as under ``partial``.

The best epoch is chosen on validation over both phases: the probed model is epoch 0's candidate, so
lp-ft never ships less than its own probe on validation.

Why the head is scaled back: cross-entropy grows the probe's norm (here about 3x, 1.6 to 5) until its logits are
confident, and a confident head passes small gradients to the features, so fine-tuning barely changes them
(Tomihari and Sato, "Understanding Linear Probing then Fine-tuning Language Models from NTK Perspective", NeurIPS
2024). That is LP-FT's point where the features must not move, but the fine-tuned features are what gives
``partial`` its lead here. On ``tools/bench/transfer.py`` (pretrained Lite0, 8 epochs, 160 px, styles unseen in
training; test top-1 over training seeds 0-2, 160 test images each) partial scored 135/143/139. With the probed
head kept as it was, lp-ft scored 135/133/127 with the unfrozen blocks' BatchNorm statistics fixed (as the
TensorFlow tutorial keeps BatchNorm in inference mode) and 129/134/122 with them training; with the head scaled
to its initial norm and the statistics training, 133/143/137 (and the head zeroed, statistics fixed: 141/138/137,
which is partial from a blank head). On scikit-learn's digits (1,197 test images, seeds 0-2) partial scored
95.0-96.7%, lp-ft with the head kept as it was 90.9% (seed 0), scaled back 95.8-96.9%. The fine-tuning LR: a
tenth of ``--lr`` (the tutorial's "base_learning_rate / 10") never beat the probe on validation in 8 epochs (seed
0); 1x did.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from edgetl.finetune.features import FeatureBatches
from edgetl.finetune.precision import resolve_precision
from edgetl.finetune.trainer import TrainConfig, Trainer, epoch_seed

log = logging.getLogger(__name__)

MAX_EPOCHS = 100
PATIENCE = 5
MIN_DELTA = 1e-4
FT_LR_SCALE = 1.0


@dataclass(frozen=True)
class ProbeResult:
    """How the probe phase went.

    Attributes:
        epochs: epochs run.
        best_epoch: the epoch whose head was kept (1-based).
        loss: its monitored loss.
        accuracy: its validation accuracy (None without a validation split).
        monitored: ``val_loss`` or ``train_loss``.
        head_norm: the kept head's weight norm, before it was scaled back to its initial norm.
        scale: the factor it was scaled by (initial norm / ``head_norm``).
        seconds: wall-clock time of the probe (feature extraction not included).
    """

    epochs: int
    best_epoch: int
    loss: float
    accuracy: float | None
    monitored: str
    head_norm: float
    scale: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_probe(
    head: nn.Module,
    train: FeatureBatches,
    val: FeatureBatches | None,
    *,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    device: torch.device,
    num_classes: int,
    seed: int,
    max_epochs: int = MAX_EPOCHS,
    patience: int = PATIENCE,
) -> ProbeResult:
    """Train ``head`` on cached features at a constant ``lr`` until the monitored loss plateaus; keep the best,
    scaled back to the weight norm ``head`` had on entry (see the module's docstring).

    Args:
        head: the new classifier layer (trained in place; left holding the best epoch's weights, scaled).
        train: training features, shuffled per epoch by their seeded sampler.
        val: validation features, or None to monitor the training loss.
        lr, weight_decay, label_smoothing: AdamW and loss settings.
        device: where the head is.
        num_classes: number of classes.
        seed: the run's seed (each epoch's order follows from it).
        max_epochs: the longest probe.
        patience: epochs without an improvement of :data:`MIN_DELTA` that end the probe.
    """
    start = time.perf_counter()
    initial_norm = weight_norm(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    config = TrainConfig(epochs=max_epochs, lr=lr, label_smoothing=label_smoothing, seed=seed, progress=False,
                         precision=resolve_precision("fp32", device))
    trainer = Trainer(head, optimizer, constant, config, device, num_classes)
    best_loss, best_epoch, best_state, best_acc = math.inf, 0, copy.deepcopy(head.state_dict()), None
    epoch = 0
    while epoch < max_epochs and epoch - best_epoch < patience:
        torch.manual_seed(epoch_seed(seed, epoch))
        train.sampler.set_epoch(epoch)
        stats = trainer.train_one_epoch(train, epoch)
        epoch += 1
        result = trainer.evaluate(val) if val is not None else None
        loss = result.loss if result is not None else stats["train_loss"]
        if loss < best_loss - MIN_DELTA:
            best_loss, best_epoch, best_acc = loss, epoch, result.accuracy if result is not None else None
            best_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    probed_norm = weight_norm(head)
    scale = initial_norm / probed_norm if probed_norm > 0 else 1.0
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    monitored = "val_loss" if val is not None else "train_loss"
    log.info("lp-ft probe: %d epochs, best %s %.4f at epoch %d; head norm %.2f scaled back to %.2f", epoch,
             monitored, best_loss, best_epoch, probed_norm, initial_norm)
    return ProbeResult(epoch, best_epoch, best_loss, best_acc, monitored, probed_norm, scale,
                       time.perf_counter() - start)


def weight_norm(head: nn.Module) -> float:
    """The Frobenius norm of ``head``'s weights (its parameters of two or more dimensions; biases left out)."""
    return math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in head.parameters() if p.ndim > 1))
