"""``--strategy auto``, measured: short trials of the candidate strategies, scored on the validation split.

The table of :mod:`edgetl.finetune.strategy` (dataset size x similarity to ImageNet) is a prior: it encodes what
usually works, and it is wrong on some datasets. Where trials are cheap, auto measures instead, as Edge Impulse's
EON Tuner does for architectures:

- **Candidates:** :data:`~edgetl.options.TRIAL_STRATEGIES` (linear, partial, full), with pretrained weights
  only: random weights hold nothing to transfer, and the table already trains everything (``full``) without
  measuring. lp-ft is not tried: its trial would run its probe to a plateau and then 3 fine-tuning epochs, so it is
  further along its curve than the others after theirs, and its trial overstates it. On the digits benchmark
  (``tools/bench/transfer.py --dataset digits``) it led partial's trial by 4 points on validation (93.5% against
  89.5%) and ended 4.1 points below partial on the test split after the full run (90.9% against 95.0%); on the
  shapes benchmark it matched partial (84.4%). It stays one ``--strategy lp-ft`` away.
- **Trials:** each candidate trains on the training split with the run's own code, options and seed, from a fresh
  copy of the pretrained model, for :data:`~edgetl.options.TRIAL_EPOCHS` epochs (fewer when ``--epochs`` is
  smaller) under its own warm-up and cosine schedule, and is scored by its best epoch on the validation split. The
  test split is never handed to a trial. Every candidate gets the same epochs: a short trial understates the
  strategies that keep improving with more epochs (full fine-tuning most), and equal epochs at least do not add a
  head start for one of them. The linear probe trains on cached features, so its trial costs one pass over the
  images (where features cannot be cached, with ``--augment`` or a head that is not the last layer, its epochs are
  forward passes through the frozen backbone, which the budget does not count).
- **Budget:** trials run when training images x trial epochs x fine-tuning candidates is at most
  :data:`~edgetl.options.TRIAL_BUDGET`; above it, auto follows the table without trials and says so.
- **Winner:** the highest validation top-1; a tie goes to the table's choice, then to the lower validation loss.
  The full run then trains the winner from scratch with the same seed (when ``--epochs`` is at most
  :data:`~edgetl.options.TRIAL_EPOCHS`, that repeats its trial exactly).
- **Fallbacks** (the table, with the reason recorded): no validation split to score on; no pretrained weights;
  over the budget; under torchrun (trials run in one process only).

The decision records the trials (:class:`TrialReport`) in ``metrics.json`` and ``checkpoint.json``; ``--resume``
reads it back and does not run them again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edgetl.options import TRIAL_BUDGET, TRIAL_EPOCHS, TRIAL_STRATEGIES

CANDIDATES = TRIAL_STRATEGIES
"""What auto tries, least of the backbone trained first."""
FINE_TUNING = tuple(s for s in CANDIDATES if s != "linear")
"""The candidates whose trials train backbone blocks: what the budget counts."""


@dataclass(frozen=True)
class Trial:
    """One candidate's trial.

    Attributes:
        strategy: the candidate.
        epochs: epochs trained (under lp-ft, of its fine-tuning phase).
        best_epoch: the epoch scored (0: lp-ft's linear probe, which no fine-tuning epoch beat).
        val_accuracy: top-1 on the validation split at ``best_epoch`` (0 for a failed trial).
        val_loss: the validation loss there (None for a failed trial).
        probe_epochs: epochs of lp-ft's linear probe (lp-ft only).
        failed: why the trial stopped (a non-finite loss), when it did: it then loses.
    """

    strategy: str
    epochs: int
    best_epoch: int
    val_accuracy: float
    val_loss: float | None
    probe_epochs: int | None = None
    failed: str | None = None


@dataclass(frozen=True)
class TrialPlan:
    """Which candidates to try and for how long, or why none.

    Attributes:
        candidates: the strategies to try (empty when none runs).
        epochs: epochs of each fine-tuning trial.
        cost: training images x epochs of the fine-tuning trials.
        budget: what they may cost.
        reason: why none runs, or their cost against the budget.
    """

    candidates: tuple[str, ...]
    epochs: int
    cost: int
    budget: int
    reason: str


def plan_trials(num_train: int, num_val: int, epochs: int, pretrained: bool, distributed: bool = False) -> TrialPlan:
    """Plan auto's trials: every candidate, :data:`TRIAL_EPOCHS` epochs each, if the data allows and the budget
    (:data:`TRIAL_BUDGET`) pays.

    Args:
        num_train, num_val: training and validation images.
        epochs: the run's ``--epochs``.
        pretrained: whether the backbone holds pretrained weights.
        distributed: whether the run is under torchrun.
    """
    trial_epochs = min(epochs, TRIAL_EPOCHS)
    cost = num_train * trial_epochs * len(FINE_TUNING)
    compare = "<=" if cost <= TRIAL_BUDGET else ">"
    cost_text = (f"{num_train} training images x {trial_epochs} epochs x {len(FINE_TUNING)} fine-tuning trials = "
                 f"{cost:,} {compare} the budget of {TRIAL_BUDGET:,}")
    skip = None
    if not pretrained:
        skip = "no pretrained weights: nothing to transfer, so nothing to try"
    elif num_val == 0:
        skip = "no validation split to score them on"
    elif distributed:
        skip = "they run in one process, not under torchrun"
    elif cost > TRIAL_BUDGET:
        skip = cost_text
    return TrialPlan(() if skip else CANDIDATES, trial_epochs, cost, TRIAL_BUDGET, skip or cost_text)


def pick_winner(trials: tuple[Trial, ...], prior: str) -> Trial:
    """The trial with the highest validation top-1; a tie goes to the table's choice ``prior``, then to the lower
    validation loss, then to the candidate that trains less of the backbone."""
    if not trials:
        raise ValueError("no trial to choose from")
    order = {s: i for i, s in enumerate(CANDIDATES)}
    return min(trials, key=lambda t: (t.failed is not None, -t.val_accuracy, t.strategy != prior,
                                      math.inf if t.val_loss is None else t.val_loss, order.get(t.strategy, 99)))


@dataclass(frozen=True)
class TrialReport:
    """What auto measured, or why it did not measure: recorded with the strategy decision.

    Attributes:
        prior: the table's choice.
        ran: whether trials ran.
        reason: why none ran, or what they cost against the budget.
        epochs: epochs of each fine-tuning trial.
        cost: training images x epochs of the fine-tuning trials.
        budget: the budget they were held to.
        trials: the trials, in the order they ran.
        chosen: the winner (None when no trial ran).
    """

    prior: str
    ran: bool
    reason: str
    epochs: int = 0
    cost: int = 0
    budget: int = TRIAL_BUDGET
    trials: tuple[Trial, ...] = ()
    chosen: str | None = None

    @classmethod
    def of(cls, plan: TrialPlan, prior: str, trials: tuple[Trial, ...] = ()) -> TrialReport:
        """The report of ``plan``'s trials (or of its reason to run none)."""
        winner = pick_winner(trials, prior) if trials else None
        chosen = winner.strategy if winner is not None and winner.failed is None else None  # all failed: the table
        return cls(prior, bool(trials), plan.reason, plan.epochs, plan.cost, plan.budget, trials, chosen)

    def summary(self) -> str:
        """What the decision's reason says about the trials."""
        if not self.ran:
            return f"no trials: {self.reason}"
        scores = ", ".join(f"{t.strategy} {'failed' if t.failed else f'{100 * t.val_accuracy:.1f}%'}"
                           for t in sorted(self.trials, key=lambda t: -t.val_accuracy))
        return f"trials, val top-1: {scores} -> {self.chosen or self.prior + ' (every trial failed)'}"

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """The trial table: strategy, epochs tried, val top-1, val loss, chosen."""
        rows = []
        for t in self.trials:
            epochs = f"{t.probe_epochs} probe + {t.epochs}" if t.probe_epochs is not None else str(t.epochs)
            top1 = "failed" if t.failed else f"{100 * t.val_accuracy:.1f}%"
            loss = "—" if t.val_loss is None else f"{t.val_loss:.4f}"
            rows.append((t.strategy, epochs, top1, loss, "yes" if t.strategy == self.chosen else ""))
        return rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trials"] = [{**asdict(t), "chosen": t.strategy == self.chosen} for t in self.trials]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialReport:
        d = dict(d)
        d["trials"] = tuple(Trial(**{k: v for k, v in t.items() if k != "chosen"}) for t in d.get("trials") or ())
        return cls(**d)
