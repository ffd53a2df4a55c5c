"""``--strategy lp-ft``: a linear probe first, then the top blocks fine-tuned from its head.

Kumar et al. ("Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
ICLR 2022) and TensorFlow's MobileNetV2 cats-vs-dogs transfer-learning tutorial train in two phases:

1. **Linear probe.** The backbone is frozen and the new head trains on the backbone's features. Here the
   features are computed once (:mod:`edgetl.finetune.features`), so each epoch costs only the head; it
   runs until the validation loss (the training loss without a validation split) has not improved by
   :data:`MIN_DELTA` for :data:`PATIENCE` epochs, at most :data:`MAX_EPOCHS`, and keeps the best head.
2. **Fine-tuning.** The top blocks are unfrozen, as under ``partial``, and train together with the
   probed head at :data:`FT_LR_SCALE` times ``--lr``, with stage-wise LR decay below. A random head would
   send large gradients into the pretrained blocks in the first steps; a probed head does not. As the
   tutorial keeps BatchNorm in inference mode, the unfrozen blocks' BatchNorm statistics stay fixed
   (:class:`~edgetl.finetune.strategy.StatsFrozenBatchNorm`; their scale and shift train), so the features
   the head was fitted to do not move with each batch's statistics.

The best epoch is chosen on validation over both phases: the probed model is epoch 0's candidate, so
lp-ft never ships less than its own probe on validation.

The fine-tuning LR was measured, not copied: on ``tools/bench/transfer.py`` (pretrained Lite0, 8 epochs,
160 px, styles unseen in training) a tenth of ``--lr`` (the tutorial's "base_learning_rate / 10") never
beat the probe on validation in 8 epochs (best 80.0% against the probe's 83.8%), 0.3x reached 81.9%,
0.5x 85.0%, and 1x 89.4% (84.4% on the test split, partial's figure); with BatchNorm statistics left
training, 1x reached 87.5% (80.6% on test). Stage-wise decay (0.7 per stage) already lowers the LR below
the top block.
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
        seconds: wall-clock time of the probe (feature extraction not included).
    """

    epochs: int
    best_epoch: int
    loss: float
    accuracy: float | None
    monitored: str
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
    """Train ``head`` on cached features at a constant ``lr`` until the monitored loss plateaus; keep the best.

    Args:
        head: the new classifier layer (trained in place; left holding the best epoch's weights).
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
    monitored = "val_loss" if val is not None else "train_loss"
    log.info("lp-ft probe: %d epochs, best %s %.4f at epoch %d", epoch, monitored, best_loss, best_epoch)
    return ProbeResult(epoch, best_epoch, best_loss, best_acc, monitored, time.perf_counter() - start)
