"""Training that cannot go on stops with one line and leaves a way forward.

- Non-finite starting weights are refused before anything is written, naming the tensor (real CLI).
- A loss that turns NaN mid-run stops the run with exit 1, naming the epoch and step; the last good
  epoch stays on disk and ``--resume`` continues from it.

(mobilenet_v3_small, random weights, 32 px, CPU, a tiny demo dataset.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetl.data import make_demo_dataset
from edgetl.errors import TrainingError
from edgetl.finetune.api import finetune
from edgetl.finetune.rundir import RunDir
from edgetl.finetune.trainer import Trainer
from edgetl.zoo.catalog import build_architecture

MODEL = "mobilenet_v3_small"
COMMON = dict(weights="none", resolution=32, batch_size=16, device="cpu", progress=False, seed=0,
              strategy="partial", unfreeze=2, augment="none")
TRAIN = ["--weights", "none", "--epochs", "1", "--resolution", "32", "--batch-size", "8", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard-data") / "demo"
    return make_demo_dataset(root, num_classes=4, train_per_class=8, val_per_class=2, test_per_class=0, size=32)


def edgetl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter (the user-facing error path: no EDGETL_DEBUG)."""
    env = {k: v for k, v in os.environ.items() if k != "EDGETL_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1]), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "edgetl", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_nan_in_starting_weights_is_refused_naming_the_tensor(demo, tmp_path):
    state = build_architecture(MODEL).state_dict()
    state["features.1.block.0.0.weight"].view(-1)[3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    proc = edgetl("finetune", "-m", MODEL, "--data", str(demo), "--out", "run", *TRAIN, "--weights", "nan.pt",
                  cwd=tmp_path)
    line = one_line_error(proc)
    assert "features.1.block.0.0.weight" in line and "1 NaN" in line and "nan.pt" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def poison_training_batch(monkeypatch, call: int) -> None:
    """Make the ``call``-th training batch (1-based) hold a NaN, so that step's loss is NaN."""
    original, calls = Trainer._to_device, []

    def to_device(self, images, labels):
        images, labels = original(self, images, labels)
        if self.forward_module.training:
            calls.append(1)
            if len(calls) == call:
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
        return images, labels

    monkeypatch.setattr(Trainer, "_to_device", to_device)


def test_nan_loss_mid_run_stops_naming_epoch_and_step_and_keeps_the_last_good_epoch(demo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_training_batch(monkeypatch, call=4)  # 32 images / 16 per batch: epoch 2, step 2
    with pytest.raises(TrainingError) as info:
        finetune(MODEL, demo, out, epochs=3, **COMMON)
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert "epoch 2, step 2 of 2" in message and "--lr" in message and f"epoch 1 is kept in {out}" in message
    assert (info.value.epoch, info.value.step) == (2, 2)
    last = RunDir(out).read_last()
    assert last["epoch"] == 1 and all(r["train_loss"] == r["train_loss"] for r in last["fit"]["history"])

    monkeypatch.undo()
    resumed = finetune(out=out, resume=True, device="cpu", progress=False)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 3
    losses = [e["train_loss"] for e in json.loads(RunDir(out).metrics.read_text())["epochs"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_nan_loss_in_the_first_epoch_says_nothing_was_saved(demo, tmp_path, monkeypatch):
    poison_training_batch(monkeypatch, call=1)
    with pytest.raises(TrainingError, match=r"epoch 1, step 1 of 2.*no epoch finished"):
        finetune(MODEL, demo, tmp_path / "run", epochs=2, **COMMON)
    assert not RunDir(tmp_path / "run").can_resume()

