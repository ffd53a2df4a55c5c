"""End-to-end fine-tuning runs on the tiny demo dataset (mobilenet_v3_small, weights=None, 32 px, CPU)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from edgetl.cli import cli
from edgetl.data import make_demo_dataset, scan_dataset
from edgetl.errors import CheckpointError, ConfigError, TrainingInterrupted
from edgetl.finetune.api import _Run, finetune, load_trained_model
from edgetl.finetune.metrics import wilson_interval
from edgetl.finetune.precision import cpu_has_native_bf16
from edgetl.finetune.rundir import RunDir
from edgetl.finetune.strategy import apply_strategy, choose_strategy
from edgetl.finetune.trainer import Trainer
from edgetl.zoo.catalog import build_architecture, get_card, replace_head

MODEL = "mobilenet_v3_small"
COMMON = dict(weights="none", resolution=32, batch_size=16, device="cpu", progress=False, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-data") / "demo"
    return make_demo_dataset(root, num_classes=4, train_per_class=8, val_per_class=4, test_per_class=2, size=32)


def trainable_count() -> int:
    """Parameters a partial run with --unfreeze 2 trains (counted on a fresh model)."""
    card = get_card(MODEL)
    model = build_architecture(MODEL)
    replace_head(model, card, 4)
    apply_strategy(model, card, choose_strategy("partial", len(card.block_paths), unfreeze=2))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_run_dir_outputs_and_metrics(demo, tmp_path):
    out = tmp_path / "run"
    result = finetune(MODEL, demo, out, strategy="partial", unfreeze=2, epochs=2, **COMMON)
    for name in ("config.yaml", "metrics.json", "curves.png", "confusion.png", "model.safetensors",
                 "checkpoint.json", "last.json", "splits.json"):
        assert (out / name).is_file(), name
    run = RunDir(out)  # the resume checkpoint is a set: last.json names one generation of its tensor files
    assert run.last_weights == run.last_weights_of(1) and run.last_optimizer == run.last_optimizer_of(1)
    assert run.last_weights.is_file() and run.last_optimizer.is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("epochs", "val_accuracy", "test_accuracy", "per_class_accuracy", "confusion_matrix", "best_epoch"):
        assert key in metrics, key
    assert len(metrics["epochs"]) == 2
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_s", "lr"):
        assert key in metrics["epochs"][0], key
    # the LR groups that trained: the head, then the stages top-down; random weights have no features to
    # protect, so no layer decay
    groups = metrics["param_groups"]
    assert groups[0]["name"] == "head" and len(groups) >= 2
    assert [g["lr_scale"] for g in groups] == [1.0] * len(groups)
    assert sum(g["params"] for g in groups) == trainable_count()
    assert metrics["precision_train"]["requested"] == "auto" and metrics["precision_train"]["device"] == "cpu"
    assert metrics["precision_train"]["dtype"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    classes = sorted(d.name for d in (demo / "train").iterdir())
    assert metrics["classes"] == classes and set(metrics["per_class_accuracy"]) == set(classes)
    assert metrics["confusion_split"] == "test"
    matrix = metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == 8 and len(matrix) == 4
    assert metrics["test_accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(4)) / 8)
    assert result.test_accuracy == metrics["test_accuracy"]
    assert result.val_accuracy == metrics["val"]["accuracy"]

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "mobilenet_v3_small.IMAGENET1K_V1" and config["strategy"] == "partial"
    assert config["resolution"] == 32 and config["augment"] == "light"

    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert ckpt["classes"] == classes
    assert ckpt["strategy"]["strategy"] == "partial" and ckpt["strategy"]["unfreeze"] == 2
    assert ckpt["preprocess"]["crop_size"] == 32 and ckpt["weights"]["weights"] == "none"
    assert ckpt["final_metrics"]["test_accuracy"] == metrics["test_accuracy"]

    # the best checkpoint is what load_trained_model returns, and reproduces the reported accuracy
    trained = load_trained_model(out)
    assert not trained.training and trained.classes == ckpt["classes"] and trained.resolution == 32
    assert trained.example_input(2).shape == (2, 3, 32, 32)
    assert trained(trained.example_input(2)).shape == (2, 4)
    assert trained.metrics["test_accuracy"] == metrics["test_accuracy"]


def test_checkpoint_loads_without_unpickling(demo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    finetune(MODEL, demo, out, strategy="linear", epochs=1, **COMMON)
    state = load_file(out / "model.safetensors")  # plain safetensors
    assert state["classifier.3.weight"].shape == (4, 1024)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    trained = load_trained_model(out)
    assert torch.equal(trained.network.classifier[3].weight, state["classifier.3.weight"])
    from edgetl.finetune import checkpoint

    meta, _, optim = checkpoint.load_last(out)
    assert meta["epoch"] == 1 and optim["state"] and "exp_avg" in optim["state"][0]


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupt_and_resume_matches_an_uninterrupted_run(demo, tmp_path, workers):
    opts = dict(strategy="partial", unfreeze=3, epochs=2, augment="light", **COMMON, workers=workers)
    full = finetune(MODEL, demo, tmp_path / "full", **opts)

    def interrupt_after_first_epoch(epoch, record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process

    out = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted) as info:
        finetune(MODEL, demo, out, callbacks=(interrupt_after_first_epoch,), **opts)
    assert info.value.exit_code == 130
    assert info.value.epochs_done == 1 and "--resume" in str(info.value)
    assert json.loads((out / "last.json").read_text())["epoch"] == 1

    with pytest.raises(CheckpointError, match="--resume"):
        finetune(MODEL, demo, out, **opts)  # a run folder is never overwritten by accident

    with pytest.raises(ConfigError, match=r"epochs=2 \(given 5\)"):
        finetune(out=out, resume=True, device="cpu", progress=False, epochs=5)  # not silently ignored

    resumed = finetune(out=out, resume=True, device="cpu", progress=False, workers=workers)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2

    a, b = load_file(RunDir(tmp_path / "full").last_weights), load_file(RunDir(out).last_weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics["epochs"] == full.metrics["epochs"] or [
        {k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for e in resumed.metrics["epochs"]
    ] == [{k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for e in full.metrics["epochs"]]
    assert resumed.val_accuracy == full.val_accuracy and resumed.test_accuracy == full.test_accuracy


def test_feature_cache_probe_matches_the_naive_loop(demo, tmp_path):
    opts = dict(strategy="linear", epochs=3, lr=3e-3, **COMMON)
    cached = finetune(MODEL, demo, tmp_path / "cached", **opts)
    naive = finetune(MODEL, demo, tmp_path / "naive", feature_cache=False, **opts)
    assert cached.feature_cache and not naive.feature_cache
    assert cached.strategy.strategy == "linear" and cached.metrics["epochs"][0]["train_images"] == 32
    assert cached.val_accuracy == pytest.approx(naive.val_accuracy, abs=1 / 16 + 1e-9)
    assert cached.test_accuracy == pytest.approx(naive.test_accuracy, abs=1 / 8 + 1e-9)
    a, b = load_file(RunDir(tmp_path / "cached").last_weights), load_file(RunDir(tmp_path / "naive").last_weights)
    assert torch.allclose(a["classifier.3.weight"], b["classifier.3.weight"], atol=1e-4)
    assert torch.equal(a["classifier.0.weight"], b["classifier.0.weight"])  # frozen
    assert torch.equal(a["features.1.block.0.1.running_mean"], b["features.1.block.0.1.running_mean"])


def test_cli_finetune_json(demo, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "finetune", "--model", MODEL, "--data", str(demo), "--out", str(out), "--weights", "none",
        "--epochs", "1", "--resolution", "32", "--batch-size", "16", "--device", "cpu", "--json",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["strategy"]["strategy"] == "full"  # no pretrained weights: nothing to transfer
    assert "no pretrained weights" in doc["strategy"]["reason"]
    assert doc["run_dir"] == str(out) and doc["skipped"] == []
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def tree(demo, tmp_path_factory):
    """The demo's train and val images as one folder of class folders, for edgetl to split."""
    root = tmp_path_factory.mktemp("finetune-tree")
    for image in sorted(demo.glob("train/*/*.png")) + sorted(demo.glob("val/*/*.png")):
        (root / image.parent.name).mkdir(exist_ok=True)
        shutil.copy(image, root / image.parent.name / f"{image.parent.parent.name}-{image.name}")
    return root


def test_test_split_is_held_out_first_and_reported_with_its_interval(tree, tmp_path, monkeypatch):
    touched: list[tuple[str, int]] = []  # what the run computed features of, and when training ended
    features, fit = _Run._features, Trainer.fit
    monkeypatch.setattr(_Run, "_features", lambda self, records, name: touched.append((name, len(records)))
                        or features(self, records, name))
    monkeypatch.setattr(Trainer, "fit", lambda self, *a: touched.append(("fit done", 0)) or fit(self, *a))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "finetune", "--model", MODEL, "--data", str(tree), "--out", str(out), "--weights", "none",
        "--strategy", "linear", "--epochs", "2", "--resolution", "32", "--batch-size", "16", "--device", "cpu",
        "--test-split", "0.2", "--json",
    ])
    assert result.exit_code == 0, result.output
    n = sum(1 for _ in tree.rglob("*.png"))  # 48 images, 4 classes
    splits = json.loads((out / "splits.json").read_text())
    test, val, train = ({p for p, _ in splits[k]} for k in ("test", "val", "train"))
    assert abs(len(test) - round(0.2 * n)) <= 4 and len(test) + len(val) + len(train) == n
    assert not test & (val | train)
    assert splits["test_split"]["requested"] == 0.2 and splits["test_split"]["fraction"] == 0.2
    again = scan_dataset(tree, val_split=0.2, test_split=0.2, seed=0)
    assert {str(p) for p, _ in again.test} == test  # the same seed, the same test images

    # the test images chose nothing: they were read only after training, and the selection counts val only
    assert touched.index(("test", len(test))) > touched.index(("fit done", 0))
    assert all(name != "test" for name, _ in touched[: touched.index(("fit done", 0))])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"]["split"] == "val" and metrics["selection"]["images"] == len(val)
    assert metrics["val"]["images"] == len(val) and metrics["val_accuracy_chose_epoch"] == metrics["val_accuracy"]
    report = metrics["test"]
    assert report["images"] == len(test) and report["accuracy"] == metrics["test_accuracy"]
    assert report["correct"] == round(report["accuracy"] * len(test))
    low, high = wilson_interval(report["correct"], len(test))
    assert report["ci95"]["method"] == "wilson" and report["ci95"]["confidence"] == 0.95
    assert [report["ci95"]["low"], report["ci95"]["high"]] == pytest.approx([low, high], abs=1e-6)
    assert sum(report["per_class_images"].values()) == len(test)
    assert set(report["per_class_accuracy"]) == set(metrics["classes"])
    doc = json.loads(result.stdout)
    assert doc["test_images"] == len(test) and doc["test_ci95"] == report["ci95"]


def test_auto_strategy_measures_the_domain_with_pretrained_weights(demo, tmp_path, monkeypatch):
    from edgetl.zoo.weights import weights_file_name

    folder = tmp_path / "weights"
    folder.mkdir()
    torch.manual_seed(5)  # random "ImageNet" weights: the ImageNet head is unsure of every image
    torch.save(build_architecture(MODEL).state_dict(), folder / weights_file_name(get_card(MODEL)))
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    opts = {**COMMON, "weights": "imagenet"}
    result = finetune(MODEL, demo, tmp_path / "run", strategy="auto", domain="auto", epochs=1, **opts)
    domain = result.strategy.domain
    assert domain.source == "measured" and domain.samples == 32 and domain.confidence < 0.5
    assert "ImageNet confidence" in result.strategy.reason
    trials = result.strategy.trials  # the table's choice is auto's prior; its trials chose what trained
    assert trials.prior == "partial" and result.strategy.strategy == trials.chosen
    ckpt = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert ckpt["weights"]["file"] == str(folder / weights_file_name(get_card(MODEL)))
    assert ckpt["strategy"]["domain"]["source"] == "measured"


def test_without_pretrained_weights_auto_trains_everything(demo, tmp_path):
    result = finetune(MODEL, demo, tmp_path / "run", strategy="auto", domain="similar", epochs=1, **COMMON)
    assert result.strategy.strategy == "full"  # not a probe of random features, whatever --domain says
    assert "no pretrained weights" in result.strategy.reason


def test_image_cache_changes_nothing_but_the_decoding(demo, tmp_path, caplog):
    opts = dict(strategy="partial", unfreeze=2, epochs=2, augment="light", **COMMON)
    with caplog.at_level(logging.INFO, logger="edgetl.data"):
        cached = finetune(MODEL, demo, tmp_path / "cached", image_cache=True, **opts)
    assert "decoded" in caplog.text and "images once" in caplog.text and cached.metrics["image_cache"]
    plain = finetune(MODEL, demo, tmp_path / "plain", image_cache=False, **opts)
    assert not plain.metrics["image_cache"]
    a, b = load_file(RunDir(tmp_path / "cached").last_weights), load_file(RunDir(tmp_path / "plain").last_weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached.metrics["epochs"][-1]["train_loss"] == plain.metrics["epochs"][-1]["train_loss"]


def _fit_without_progress(epochs: int, patience: int):
    """A loop whose validation accuracy can never improve (learning rate 0): each epoch after the first is bad."""
    from edgetl.finetune.precision import resolve_precision
    from edgetl.finetune.trainer import TrainConfig, make_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = TrainConfig(epochs=epochs, patience=patience, progress=False, precision=resolve_precision("fp32", "cpu"))
    trainer = Trainer(model, optimizer, make_scheduler(optimizer, 2, epochs, 0), config, torch.device("cpu"), 2)
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    return trainer.fit(batches, batches)


def test_early_stop_only_when_epochs_were_left():
    ran_all = _fit_without_progress(epochs=3, patience=2)  # patience runs out on the last epoch: nothing stopped
    assert (ran_all.epoch, ran_all.bad_epochs, ran_all.stopped_early) == (3, 2, False)
    stopped = _fit_without_progress(epochs=5, patience=2)  # it runs out after epoch 3 of 5
    assert (stopped.epoch, stopped.stopped_early) == (3, True)
