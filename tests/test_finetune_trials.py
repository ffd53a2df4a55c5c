"""--strategy auto, measured: short trials scored on validation, the table as prior and fallback, and the record."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edgetl.data import make_demo_dataset
from edgetl.errors import ConfigError, TrainingInterrupted
from edgetl.finetune import api, trials
from edgetl.finetune.api import finetune
from edgetl.finetune.rundir import RunDir
from edgetl.finetune.strategy import DomainEstimate, StrategyDecision, choose_strategy
from edgetl.finetune.trials import CANDIDATES, FINE_TUNING, Trial, TrialReport, pick_winner, plan_trials
from edgetl.options import TRIAL_BUDGET, TRIAL_EPOCHS
from edgetl.report import _finetune_section, _strategy_lines
from edgetl.zoo.catalog import build_architecture, get_card
from edgetl.zoo.weights import weights_file_name

MODEL = "mobilenet_v3_small"
CLASSES = 4
COMMON = dict(weights="imagenet", resolution=32, batch_size=16, device="cpu", progress=False, seed=0,
              precision_train="fp32", lr=3e-3, domain="similar")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the plan and the choice ---------------------------------------------------------------------


def test_trials_run_while_the_budget_pays_and_say_why_not_otherwise():
    plan = plan_trials(320, 160, epochs=8, pretrained=True)
    assert plan.candidates == CANDIDATES and plan.epochs == TRIAL_EPOCHS
    assert plan.cost == 320 * TRIAL_EPOCHS * len(FINE_TUNING) and "<= the budget" in plan.reason
    assert "lp-ft" not in plan.candidates and "linear" not in FINE_TUNING
    per_image = TRIAL_EPOCHS * len(FINE_TUNING)
    at_limit = plan_trials(TRIAL_BUDGET // per_image, 100, epochs=8, pretrained=True)
    over = plan_trials(TRIAL_BUDGET // per_image + 1, 100, epochs=8, pretrained=True)
    assert at_limit.candidates and not over.candidates
    assert f"> the budget of {TRIAL_BUDGET:,}" in over.reason
    assert plan_trials(320, 160, epochs=2, pretrained=True).epochs == 2  # never longer than the run
    assert "no pretrained weights" in plan_trials(320, 160, 8, pretrained=False).reason
    assert "no validation split" in plan_trials(320, 0, 8, pretrained=True).reason
    assert "torchrun" in plan_trials(320, 160, 8, pretrained=True, distributed=True).reason
    assert not plan_trials(320, 0, 8, pretrained=True).candidates


def _trial(strategy: str, acc: float, loss: float = 1.0, failed: str | None = None) -> Trial:
    return Trial(strategy, 3, 2, acc, None if failed else loss, failed=failed)


def test_the_best_validation_top1_wins_and_the_table_breaks_ties():
    run = (_trial("linear", 0.70, 0.5), _trial("partial", 0.80, 0.9), _trial("full", 0.75, 0.4))
    assert pick_winner(run, prior="linear").strategy == "partial"  # the measurement overrules the table
    tie = (_trial("linear", 0.80, 0.5), _trial("partial", 0.80, 0.9), _trial("full", 0.80, 0.4))
    assert pick_winner(tie, prior="partial").strategy == "partial"  # a tie goes to the table's choice
    best_two = (_trial("linear", 0.80, 0.5), _trial("partial", 0.70, 0.3), _trial("full", 0.80, 0.4))
    assert pick_winner(best_two, prior="partial").strategy == "full"  # then to the lower validation loss
    diverged = (_trial("linear", 0.5), _trial("full", 0.0, failed="the training loss became NaN"))
    assert pick_winner(diverged, prior="full").strategy == "linear"  # a failed trial loses
    plan = plan_trials(32, 16, 3, pretrained=True)
    nothing = TrialReport.of(plan, "partial", (_trial("full", 0.0, failed="NaN"),))
    assert nothing.chosen is None and "every trial failed" in nothing.summary()


def test_the_decision_carries_its_trials_and_reads_back():
    plan = plan_trials(32, 16, 3, pretrained=True)
    report = TrialReport.of(plan, "linear", (_trial("linear", 0.5), _trial("full", 0.75)))
    decision = choose_strategy("auto", 14, 32, 4, DomainEstimate("similar", "user"), trials=report)
    assert decision.strategy == "full" and decision.trials.chosen == "full" and decision.unfreeze == 14
    assert "-> linear by the table; trials, val top-1: full 75.0%, linear 50.0% -> full" in decision.reason
    record = json.loads(json.dumps(decision.to_dict()))
    assert [t["chosen"] for t in record["trials"]["trials"]] == [False, True]
    assert StrategyDecision.from_dict(record) == decision
    old = {k: v for k, v in record.items() if k != "trials"}  # a checkpoint written before trials existed
    assert StrategyDecision.from_dict(old).trials is None
    explicit = choose_strategy("partial", 14, trials=report)
    assert explicit.trials is None and explicit.strategy == "partial"


# --- runs ----------------------------------------------------------------------------------------


def _weights_with_dead_features(folder: Path, data: Path) -> Path:
    """'Pretrained' weights a linear probe cannot use and fine-tuning can: random weights whose BatchNorm
    statistics are measured on the training images (so activations are well scaled), with the layer below the head
    zeroed, so every image has the same features (the probe stays at chance) until a trial trains that layer."""
    torch.manual_seed(5)
    model = build_architecture(MODEL)
    paths = sorted((data / "train").rglob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in paths])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batch below
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model((torch.from_numpy(images).permute(0, 3, 1, 2) - 0.45) / 0.225)
        model.classifier[0].weight.zero_()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / weights_file_name(get_card(MODEL)))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("trials")
    data = make_demo_dataset(base / "demo", num_classes=CLASSES, train_per_class=8, val_per_class=4,
                             test_per_class=2, size=32)
    return data, _weights_with_dead_features(base / "weights", data)


@pytest.fixture
def weights(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(setup[1]))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return setup[1]


class _Spy:
    """Counts auto's trials and the records each trial's loaders are given (the real code runs)."""

    def __init__(self, monkeypatch):
        self.trials: list[str] = []
        self.records: set[str] = set()
        score, loader = api._Trial.score, api._Trial._image_loader

        def counting_score(trial):
            self.trials.append(trial.decision.strategy)
            return score(trial)

        def recording_loader(trial, records, *args, **kwargs):
            self.records.update(str(p) for p, _ in records)
            return loader(trial, records, *args, **kwargs)

        monkeypatch.setattr(api._Trial, "score", counting_score)
        monkeypatch.setattr(api._Trial, "_image_loader", recording_loader)


def test_trials_overrule_a_wrong_table_and_the_run_trains_the_winner(setup, weights, tmp_path, monkeypatch):
    data, _ = setup
    spy = _Spy(monkeypatch)
    out = tmp_path / "auto"
    result = finetune(MODEL, data, out, strategy="auto", epochs=3, **COMMON)
    report = result.strategy.trials
    assert report.ran and report.prior == "linear"  # small and (said to be) similar: the table says linear
    scores = {t.strategy: t.val_accuracy for t in report.trials}
    assert list(scores) == list(CANDIDATES) and spy.trials == list(CANDIDATES)
    assert scores["linear"] == pytest.approx(1 / CLASSES)  # dead features: every image gets the same class
    assert result.strategy.strategy == report.chosen != "linear"
    assert scores[report.chosen] == max(scores.values())  # the winner has the best validation top-1
    # the trials saw the training and validation images, never the test split's
    splits = json.loads((out / "splits.json").read_text())
    test = {p for p, _ in splits["test"]}
    assert test and not spy.records & test
    assert spy.records == {p for p, _ in splits["train"]} | {p for p, _ in splits["val"]}
    # the trial table is recorded with the decision in metrics.json and checkpoint.json
    metrics = json.loads((out / "metrics.json").read_text())
    recorded = metrics["strategy"]["trials"]
    assert [(t["strategy"], t["val_accuracy"], t["chosen"]) for t in recorded["trials"]] == [
        (t.strategy, t.val_accuracy, t.strategy == report.chosen) for t in report.trials]
    assert json.loads((out / "checkpoint.json").read_text())["strategy"]["trials"] == recorded
    report_md = "\n".join(_strategy_lines(metrics["strategy"]))  # and report.md shows it
    assert "| strategy | epochs tried | val top-1 | val loss | chosen |" in report_md
    assert f"| {report.chosen} | {TRIAL_EPOCHS} | {100 * scores[report.chosen]:.1f}% |" in report_md
    # the run then trains the winner from scratch with the same seed: what --strategy <winner> trains
    explicit = finetune(MODEL, data, tmp_path / "explicit", strategy=report.chosen, epochs=3, **COMMON)
    a, b = load_file(RunDir(out).last_weights), load_file(RunDir(tmp_path / "explicit").last_weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.val_accuracy == explicit.val_accuracy


def test_over_the_budget_auto_follows_the_table_and_says_why(setup, weights, tmp_path, monkeypatch):
    data, _ = setup
    spy = _Spy(monkeypatch)
    cost = 8 * CLASSES * TRIAL_EPOCHS * len(FINE_TUNING)
    monkeypatch.setattr(trials, "TRIAL_BUDGET", cost - 1)  # a dataset one image-epoch over the budget
    result = finetune(MODEL, data, tmp_path / "run", strategy="auto", epochs=3, **COMMON)
    assert result.strategy.strategy == "linear" and spy.trials == []
    assert (f"no trials: {8 * CLASSES} training images x {TRIAL_EPOCHS} epochs x {len(FINE_TUNING)} fine-tuning "
            f"trials = {cost} > the budget of {cost - 1}") in result.strategy.reason
    recorded = result.metrics["strategy"]["trials"]
    assert recorded["ran"] is False and recorded["trials"] == [] and recorded["budget"] == cost - 1


def test_without_a_validation_split_auto_follows_the_table_and_says_why(weights, tmp_path, monkeypatch):
    data = make_demo_dataset(tmp_path / "no-val", num_classes=2, train_per_class=8, val_per_class=0, size=32)
    spy = _Spy(monkeypatch)
    result = finetune(MODEL, data, tmp_path / "run", strategy="auto", epochs=1, val_split=0.0, test_split=0.0,
                      **COMMON)
    assert result.strategy.strategy == "linear" and spy.trials == []
    assert "no trials: no validation split to score them on" in result.strategy.reason
    assert result.metrics["strategy"]["trials"]["ran"] is False


def test_without_pretrained_weights_auto_runs_no_trials(setup, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    # --feature-cache asks for the cache where auto picks linear; auto picks full here, so it trains without it
    result = finetune(MODEL, setup[0], tmp_path / "build" / "run", strategy="auto", epochs=1, feature_cache=True,
                      layer_decay=0.5, **{**COMMON, "weights": "none"})
    assert result.strategy.strategy == "full" and spy.trials == []
    assert "nothing to transfer" in result.metrics["strategy"]["trials"]["reason"]
    assert result.feature_cache is False
    with pytest.raises(ConfigError, match="the feature cache cannot be used: the strategy is full"):
        finetune(MODEL, setup[0], tmp_path / "full", strategy="full", epochs=1, feature_cache=True,
                 **{**COMMON, "weights": "none"})
    # the report gives each block's LR factor from the run's layer decay
    section = "\n".join(_finetune_section(tmp_path / "build", tmp_path / "plots"))
    assert "| layer-wise LR decay | 0.5 per block: the top block trains at the head's LR × 0.5, the next at × 0.25 |" \
        in section, section


def test_resume_keeps_the_decision_and_runs_no_trials_again(setup, weights, tmp_path, monkeypatch):
    data, _ = setup

    def interrupt(epoch, _record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        finetune(MODEL, data, out, strategy="auto", epochs=3, callbacks=(interrupt,), **COMMON)
    decided = json.loads((out / "last.json").read_text())["strategy"]
    assert decided["trials"]["ran"] and decided["strategy"] != "linear"
    spy = _Spy(monkeypatch)
    resumed = finetune(out=out, resume=True, device="cpu", progress=False)
    assert resumed.resumed_from == 1 and spy.trials == []
    assert resumed.metrics["strategy"] == decided
