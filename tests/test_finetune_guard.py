"""Training that cannot go on stops with one line and leaves a way forward.

- Non-finite starting weights are refused before anything is written, naming the tensor (real CLI).
- A loss that turns NaN mid-run stops the run with exit 1, naming the epoch and step; the last good
  epoch stays on disk and ``--resume`` continues from it.
- A resume checkpoint torn by a kill resumes from the generation before; a run that cannot resume is
  cleared by ``--restart`` (only an edgetl run folder, and only the run's own files).
- A kill at any step of saving the best checkpoint leaves a pair that export and ``--resume`` read: the
  previous one or the new one, never weights with another save's ``checkpoint.json``.

(mobilenet_v3_small, random weights, 32 px, CPU, a tiny demo dataset.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetl.data import make_demo_dataset
from edgetl.errors import ConfigError, TrainingError, TrainingInterrupted
from edgetl.export.api import export
from edgetl.finetune.api import finetune
from edgetl.finetune.checkpoint import best_steps, load_best, save_best
from edgetl.finetune.model import load_trained_model
from edgetl.finetune.rundir import LEGACY_LAST_FILES, WEIGHTS_FILE, RunDir
from edgetl.finetune.trainer import Trainer
from edgetl.folders import LOCK_FILE
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


def interrupted_run(demo, out: Path, after: int, epochs: int = 3) -> None:
    """A run stopped (as Ctrl-C does) after epoch ``after``, every epoch written to disk."""
    import signal

    def stop(epoch, record):
        if epoch == after:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        finetune(MODEL, demo, out, epochs=epochs, checkpoint_interval=0, callbacks=(stop,), **COMMON)


def test_a_checkpoint_torn_by_a_kill_resumes_from_the_previous_generation(demo, tmp_path):
    out = tmp_path / "run"
    interrupted_run(demo, out, after=2)
    run = RunDir(out)
    assert run.read_last()["generation"] == 2 and run.last_generations() == {2}  # older generations removed
    # killed while saving epoch 3: its tensor files are (partly) written, last.json still names generation 2
    shutil.copy(run.last_weights, run.last_weights_of(3))
    (out / f".{run.last_optimizer_of(3).name}.x1y2.tmp").write_bytes(b"\0" * 100)
    proc = edgetl("finetune", "--out", "run", "--resume", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == 2 and json.loads(proc.stdout)["epochs_run"] == 3
    assert run.read_last()["epoch"] == 3 and run.last_generations() == {run.read_last()["generation"]} == {4}


def legacy_layout(out: Path, tear: bool) -> None:
    """Turn a run into the layout edgetl wrote before generations (optionally torn by a kill mid-save)."""
    run = RunDir(out)
    meta = json.loads(run.last.read_text())
    run.last_weights.rename(out / LEGACY_LAST_FILES[0])
    run.last_optimizer.rename(out / LEGACY_LAST_FILES[1])
    meta.pop("generation")
    meta.update(weights_file=LEGACY_LAST_FILES[0], optimizer_file=LEGACY_LAST_FILES[1])
    if tear:  # the optimizer file was rewritten by the next save, then the process was killed
        meta["token"] = "0" * 16
    run.last.write_text(json.dumps(meta))


def test_a_run_from_before_generations_resumes(demo, tmp_path):
    out = tmp_path / "run"
    interrupted_run(demo, out, after=1, epochs=2)
    legacy_layout(out, tear=False)
    resumed = finetune(out=out, resume=True, device="cpu", progress=False)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2
    assert not (out / LEGACY_LAST_FILES[0]).exists() and RunDir(out).last_generations() == {1}


def test_restart_clears_a_run_that_cannot_resume_and_refuses_a_foreign_folder(demo, tmp_path):
    out = tmp_path / "run"
    interrupted_run(demo, out, after=1, epochs=2)
    legacy_layout(out, tear=True)
    (out / "notes.txt").write_text("mine")
    line = one_line_error(edgetl("finetune", "--out", "run", "--resume", cwd=tmp_path))
    assert "does not belong to the checkpoint" in line and "--restart" in line
    line = one_line_error(edgetl("finetune", "-m", MODEL, "--data", str(demo), "--out", "run", *TRAIN, cwd=tmp_path))
    assert "already holds a run" in line and "--restart" in line

    proc = edgetl("finetune", "-m", MODEL, "--data", str(demo), "--out", "run", *TRAIN, "--restart", "--json",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] is None and json.loads(proc.stdout)["epochs_run"] == 1
    assert RunDir(out).last_generations() == {1} and not (out / LEGACY_LAST_FILES[1]).exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are removed

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not ours")
    line = one_line_error(edgetl("finetune", "-m", MODEL, "--data", str(demo), "--out", "photos", *TRAIN,
                                 "--restart", cwd=tmp_path))
    assert "files that edgetl did not write" in line and (foreign / "cat.jpg").read_bytes() == b"not ours"
    with pytest.raises(ConfigError, match="give one of them"):
        finetune(out=out, resume=True, restart=True)


# --- the best checkpoint, killed mid-save ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(MODEL, demo, out, epochs=1, **COMMON)
    finally:
        torch.set_num_threads(threads)
    return out


def _fields(meta: dict) -> dict:
    """A checkpoint.json state without what each save writes itself: what ``save_best`` is given."""
    return {k: v for k, v in meta.items() if k not in ("format", "version", "token", "weights_file", "weights_sha256")}


def killed_while_saving_best(run: Path, steps_done: int) -> tuple[dict, dict]:
    """Save new best weights (the old ones with the head's bias + 1) into ``run`` and stop after ``steps_done``
    steps, as a kill would; return (old weights, new weights)."""
    meta, old = load_best(run)
    new = {**old, HEAD_BIAS: old[HEAD_BIAS] + 1}
    steps = best_steps(run, new, _fields(meta))
    done = [next(steps) for _ in range(steps_done)]
    assert len(done) == steps_done
    return old, new


BEST_STEPS = 5
HEAD_BIAS = "classifier.3.bias"


@pytest.mark.parametrize("steps_done", range(BEST_STEPS + 1))
def test_a_kill_at_any_step_of_saving_the_best_leaves_a_pair_export_and_resume_read(finished_run, tmp_path,
                                                                                    steps_done):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    old, new = killed_while_saving_best(out, steps_done)
    expected = new if steps_done >= 2 else old  # step 2 (checkpoint.json names the new weights) commits
    _, weights = load_best(out)  # checks the token of the weights against checkpoint.json
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    trained = load_trained_model(out)  # what export and predict read
    assert torch.equal(trained.network.state_dict()[HEAD_BIAS], expected[HEAD_BIAS])
    assert RunDir(out).weights in RunDir(out).outputs() and RunDir(out).weights.is_file()

    export(out, tmp_path / "art", precision="fp32", device="x86", rounds=1)
    resumed = finetune(out=out, resume=True, device="cpu", progress=False)  # reads the best back to evaluate it
    assert resumed.resumed_from == 1 and resumed.epochs_run == 1
    if steps_done == BEST_STEPS:
        assert RunDir(out).weights == out / WEIGHTS_FILE and sorted(out.glob("model.*")) == [out / WEIGHTS_FILE]


def test_the_next_save_removes_what_a_killed_one_left_and_restart_clears_it(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    killed_while_saving_best(out, 1)  # a staged file checkpoint.json does not name
    killed_while_saving_best(out, 3)  # checkpoint.json names a staged file that was renamed into place
    staged = list(out.glob("model.*.safetensors"))
    assert len(staged) == 1 and json.loads((out / "checkpoint.json").read_text())["weights_file"] != WEIGHTS_FILE
    (out / f".{staged[0].name}.ab12cd34.tmp").write_bytes(b"\0" * 10)  # and a staged write killed midway
    meta, weights = load_best(out)
    save_best(out, weights, _fields(meta))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".model", "model"))) == [WEIGHTS_FILE]
    assert json.loads((out / "checkpoint.json").read_text())["weights_file"] == WEIGHTS_FILE

    killed_while_saving_best(out, 2)
    (out / "notes.txt").write_text("mine")
    RunDir(out).clear()
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["notes.txt"]
