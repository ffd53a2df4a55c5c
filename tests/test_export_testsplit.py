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


@pytest.fixture(scope="module")
def int8_artifact(run_dir, tmp_path_factory):
    return export(run_dir, tmp_path_factory.mktemp("int8") / "artifact", precision="int8", check=False, **FAST)


def test_export_chooses_on_validation_and_reports_on_test(run_dir, int8_artifact):
    acc = json.loads((int8_artifact.path / "manifest.json").read_text())["accuracy"]
    assert acc["chosen_on"] == acc["source"] and acc["chosen_on"].startswith("val split of")
    assert acc["images"] == 12
    test = acc["test"]
    assert acc["reported_on"] == test["source"] and test["source"].startswith("test split of")
    assert test["precision"] == "int8" and test["images"] == 15
    classes = json.loads((int8_artifact.path / "labels.json").read_text())
    for which in ("fp32", "artifact"):
        rep = test[which]
        assert rep["images"] == 15 and rep["top1"] == pytest.approx(100 * rep["correct"] / 15, abs=1e-3)
        assert rep["top1_ci95"]["method"] == "wilson" and rep["top1_ci95"]["low"] <= rep["top1"] <= \
            rep["top1_ci95"]["high"]
        assert rep["per_class_images"] == dict.fromkeys(classes, 5)
    assert test["drop_pts"] == pytest.approx(test["fp32"]["top1"] - test["artifact"]["top1"], abs=1e-3)
    drops = test["per_class_drop_pts"]
    assert set(drops) == set(classes)
    assert test["worst_class"] == {"name": max(drops, key=drops.get), "drop_pts": max(drops.values())}


def test_drop_report_per_class_and_worst_class():
    import numpy as np

    labels = np.array([0, 0, 1, 1, 2, 2])
    fp32 = np.eye(3)[labels]
    got = np.eye(3)[[0, 0, 1, 0, 1, 1]]  # class 1 loses one image of two, class 2 both
    rep = evaluate.drop_report(fp32, got, labels, ["a", "b", "c"], "test split of R")
    assert rep["fp32"]["top1"] == 100.0 and rep["artifact"]["top1"] == pytest.approx(50.0)
    assert rep["per_class_drop_pts"] == {"a": 0.0, "b": 50.0, "c": 100.0}
    assert rep["worst_class"] == {"name": "c", "drop_pts": 100.0}
    assert rep["artifact"]["top1_ci95"]["high"] < 100 and rep["fp32"]["top1_ci95"]["high"] == 100.0


QUICK = dict(iterations=3, warmup=1, write=False, check=False)


@pytest.fixture(scope="module")
def fp32_artifact(run_dir, tmp_path_factory):
    return export(run_dir, tmp_path_factory.mktemp("fp32") / "artifact", precision="fp32", check=False, **FAST)


def _independent_top1(artifact_dir, run_dir):
    """Plain ONNX Runtime and torchvision's transforms built from the artifact's preprocess.json (not edgetl's
    preprocessing) over the test images listed in splits.json: what a user checking the figure would write."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    from torchvision import transforms as T

    doc = json.loads((artifact_dir / "preprocess.json").read_text())
    assert doc["color_order"] == "RGB" and doc["layout"] == "NCHW" and abs(doc["scale"] - 1 / 255) < 1e-12
    transform = T.Compose([
        T.Resize(doc["resize"]["size"], interpolation=T.InterpolationMode(doc["resize"]["interpolation"])),
        T.CenterCrop(doc["crop"]["size"]), T.ToTensor(), T.Normalize(doc["mean"], doc["std"]),
    ])
    session = ort.InferenceSession(str(artifact_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    test = _splits(run_dir)["test"]
    x = np.stack([transform(Image.open(p).convert("RGB")).numpy() for p, _ in test])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return 100.0 * float(np.mean(logits.argmax(1) == np.array([y for _, y in test]))), len(test)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_validate_on_the_test_split_measures_what_export_reported(which, run_dir, fp32_artifact, int8_artifact):
    from edgetl.validate import validate

    artifact = {"fp32": fp32_artifact, "int8": int8_artifact}[which]
    reported = json.loads((artifact.path / "manifest.json").read_text())["accuracy"]["test"]
    assert reported["precision"] == which
    measured = validate(artifact.path, run=run_dir, split="test", **QUICK).accuracy
    assert measured["data"].startswith("test split of") and measured["images"] == 15
    for key in ("top1", "correct", "images", "top1_ci95", "per_class_top1", "per_class_images"):
        assert measured[key] == reported["artifact"][key], key
    top1, n = _independent_top1(artifact.path, run_dir)
    assert abs(top1 - reported["artifact"]["top1"]) <= 100.0 / n + 1e-9  # within one image


def test_validate_cli_split_and_its_refusals(run_dir, int8_artifact, tmp_path):
    from click.testing import CliRunner

    from edgetl.cli import cli

    art = str(int8_artifact.path)
    base = ["validate", art, "--iterations", "3", "--warmup", "1", "--json"]
    result = CliRunner().invoke(cli, [*base, "--run", str(run_dir), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"]["images"] == 12
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    splits = _splits(run)
    splits["test"] = []
    (run / "splits.json").write_text(json.dumps(splits))
    for args, needle in (([*base, "--run", str(run)], "--test-split"),
                         ([*base, "--split", "test"], "--run RUN"),
                         ([*base, "--run", str(run_dir), "--data", str(run)], "not both")):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and needle in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
