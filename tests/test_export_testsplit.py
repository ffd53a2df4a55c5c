"""The test split only reports: export chooses on validation (never on test), reports on test, and
``validate --run RUN --split test`` measures what export reported."""

import json
import shutil

import pytest
import torch

from edgetl.data import make_demo_dataset
from edgetl.export import evaluate
from edgetl.export.api import export
from edgetl.finetune.api import finetune

FAST = dict(rounds=2, device="x86")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """resnet18 (random init, 32 px) after one linear-probe epoch on 3 classes with a test folder."""
    base = tmp_path_factory.mktemp("testsplit-run")
    data = make_demo_dataset(base / "demo", num_classes=3, train_per_class=8, val_per_class=4, test_per_class=5,
                             size=32)
    torch.set_num_threads(1)
    finetune("resnet18", data, base / "run", weights="none", resolution=32, batch_size=16, epochs=1,
             strategy="linear", device="cpu", progress=False, seed=0)
    return base / "run"


def _splits(run):
    return json.loads((run / "splits.json").read_text())


def _record_decoded(monkeypatch):
    """Every image path export decodes, in order."""
    seen: list[str] = []
    real = evaluate.try_decode

    def spy(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "try_decode", spy)
    return seen


def test_the_run_has_a_test_split_held_apart(run_dir):
    splits = _splits(run_dir)
    assert len(splits["test"]) == 15 and len(splits["val"]) == 12
    assert evaluate.run_eval_set(run_dir).source.startswith("val split")
    assert {p for p, _ in evaluate.run_split_set(run_dir, "test").records} == {p for p, _ in
                                                                              evaluate._records(splits["test"])}


def test_without_a_validation_split_export_chooses_on_no_labels_never_on_test(run_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    splits = _splits(run)
    splits["val"] = []
    (run / "splits.json").write_text(json.dumps(splits))
    assert evaluate.run_eval_set(run) is None
    test_paths = {p for p, _ in splits["test"]}
    decoded = _record_decoded(monkeypatch)
    artifact = export(run, tmp_path / "art", precision="int8", check=False, progress=decoded.append, **FAST)
    acc = artifact.accuracy
    assert acc["measured"] is False and "no validation split" in acc["reason"]
    assert acc["chosen_on"].startswith("top-1 agreement with PyTorch on calibration images")
    report = next((i for i, m in enumerate(decoded) if m.startswith("reporting on")), len(decoded))
    choosing = set(decoded[:report])
    assert choosing & {p for p, _ in splits["train"]} and not choosing & test_paths  # no test image chose
