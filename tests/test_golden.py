"""Golden outputs: export stores a few prepared validation images and the model's outputs on them;
``validate`` and ``predict --check`` re-run them first and fail (exit 1, one line) on a divergence.

The tampering is what an attacker without a signing key, or a broken toolchain, does: change a file, re-hash it
into the manifest and recompute the manifest's digest, so every checksum matches again. The export and the checks
run through the real command line in fresh processes.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from clirun import edgetl_cli
from onnx import numpy_helper

import edgetl
from edgetl.data import make_demo_dataset
from edgetl.data.preprocess import read_spec
from edgetl.export import bundle, golden
from edgetl.finetune.api import finetune

FAST = ["--iterations", "3", "--warmup", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """resnet18 (random init, 32 px) after one linear-probe epoch on a 3-class demo dataset, and its data."""
    base = tmp_path_factory.mktemp("golden-run")
    data = make_demo_dataset(base / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=40)
    torch.set_num_threads(1)
    finetune("resnet18", data, base / "run", weights="none", resolution=32, batch_size=16, epochs=1,
             strategy="linear", device="cpu", progress=False, seed=0)
    return base / "run", data


@pytest.fixture(scope="module")
def artifact(run, tmp_path_factory):
    """The run exported in FP32 through the real CLI."""
    out = tmp_path_factory.mktemp("golden") / "artifact"
    proc = edgetl_cli("export", run[0], "--out", out, "--precision", "fp32", "--rounds", "2", "--device", "x86")
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "artifact"
    shutil.copytree(src, dest)
    (dest / bundle.VALIDATION_FILE).unlink(missing_ok=True)
    return dest


def _rehash(folder: Path, edit=None) -> None:
    """Re-hash every listed file into the manifest (after ``edit`` changes it) and recompute its digest."""
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    if edit is not None:
        edit(manifest)
    manifest["files"] = {name: bundle.file_record(folder / name) for name in manifest["files"]}
    (folder / bundle.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    (folder / bundle.DIGEST_FILE).write_text(bundle.manifest_digest(manifest) + "\n")


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _scale_one_initializer(path: Path, factor: float = 1.05) -> str:
    """Scale the classifier's weight matrix (the last 2-D initializer) by ``factor``; return its name."""
    model = onnx.load(str(path))
    init = [t for t in model.graph.initializer if len(t.dims) == 2][-1]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(path))
    return init.name


def test_export_stores_real_validation_images_and_their_outputs(artifact, run):
    manifest = json.loads((artifact / bundle.MANIFEST_FILE).read_text())
    section = manifest["golden"]
    assert golden.GOLDEN_FILE in manifest["files"] and section["file"] == golden.GOLDEN_FILE
    assert section["inputs"] == golden.MAX_INPUTS and not section["synthetic"] and "val split" in section["source"]
    assert section["tolerances"] == golden.TOLERANCES and section["preprocess_atol"] == golden.PREPROCESS_ATOL
    with np.load(artifact / golden.GOLDEN_FILE, allow_pickle=False) as data:
        inputs, outputs = data["inputs"], data["outputs"]
        images = [data[f"image_{i}"] for i in range(len(inputs))]
    assert inputs.shape == (4, 3, 32, 32) and inputs.dtype == np.float32 and outputs.shape == (4, 3)
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in images)
    assert section["top1"] == outputs.argmax(1).tolist()
    from edgetl.data.preprocess import load_tensor  # the stored inputs are the one preprocessing of real files

    spec = read_spec(artifact / bundle.PREPROCESS_FILE)
    assert any(np.array_equal(load_tensor(p, spec), inputs[0]) for p in (run[1] / "val").rglob("*.png"))


def test_validate_passes_and_records_the_golden_check(artifact, tmp_path):
    folder = _copy(artifact, tmp_path)
    proc = edgetl_cli("validate", folder, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "golden outputs" in proc.stdout and "4 inputs reproduced on onnxruntime" in proc.stdout
    report = json.loads((folder / bundle.VALIDATION_FILE).read_text())["golden"]
    assert report["status"] == "passed" and report["inputs"] == 4 and report["precision"] == "fp32"
    assert report["max_abs_diff"] <= report["tolerance"] and report["preprocess_max_diff"] == 0.0


def test_a_changed_weight_rehashed_fails_validate_naming_the_largest_difference(artifact, tmp_path):
    folder = _copy(artifact, tmp_path)
    _scale_one_initializer(folder / bundle.MODEL_FILE)
    _rehash(folder)
    proc = edgetl_cli("validate", folder, *FAST)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "golden input" in line and "logit" in line and "expected" in line and "got" in line
    assert "fp32 tolerance" in line, line
    assert not (folder / bundle.VALIDATION_FILE).exists()  # nothing was timed


def test_a_rehashed_preprocess_json_is_caught_by_preparing_the_stored_images(artifact, tmp_path):
    folder = _copy(artifact, tmp_path)
    path = folder / bundle.PREPROCESS_FILE
    doc = json.loads(path.read_text())
    doc["mean"][0] = round(doc["mean"][0] + 0.01, 6)
    path.write_text(json.dumps(doc, indent=2))
    _rehash(folder)
    proc = edgetl_cli("validate", folder, *FAST)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "golden input 0" in line and "preprocess.json differs from export's" in line and "c=0" in line, line


def test_predict_check_passes_on_a_good_artifact_and_fails_on_a_tampered_one(artifact, run, tmp_path):
    image = next((run[1] / "val").rglob("*.png"))
    good = edgetl_cli("predict", artifact, image, "--check")
    assert good.returncode == 0, good.stderr
    folder = _copy(artifact, tmp_path)
    _scale_one_initializer(folder / bundle.MODEL_FILE)
    _rehash(folder)
    assert edgetl_cli("predict", folder, image).returncode == 0  # without --check nothing is re-run
    bad = edgetl_cli("predict", folder, image, "--check")
    assert bad.returncode == 1 and "golden input" in _one_error_line(bad)
    assert bad.stdout == ""
    with pytest.raises(golden.GoldenMismatchError, match="fp32 tolerance"):
        edgetl.predict(folder, [image], check=True)
    assert edgetl.predict(artifact, [image], check=True)[0].label


def test_an_artifact_without_golden_outputs_is_validated_with_a_note(artifact, tmp_path):
    folder = _copy(artifact, tmp_path)
    (folder / golden.GOLDEN_FILE).unlink()

    def drop(manifest):
        del manifest["files"][golden.GOLDEN_FILE]
        del manifest["golden"]

    _rehash(folder, drop)
    proc = edgetl_cli("validate", folder, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "no golden outputs (artifact made before" in proc.stdout
    assert json.loads((folder / bundle.VALIDATION_FILE).read_text())["golden"]["status"] == "absent"


def test_no_labelled_images_gives_deterministic_synthetic_inputs(tmp_path):
    def make(name):
        return edgetl.export("resnet18", tmp_path / name, precision="fp32", weights="none", resolution=32,
                             rounds=2, simplify=False, device="x86")

    a, b = make("a"), make("b")
    section = a.manifest["golden"]
    assert section["synthetic"] and "synthetic" in section["source"] and section["inputs"] == golden.MAX_INPUTS
    with np.load(a.path / golden.GOLDEN_FILE) as x, np.load(b.path / golden.GOLDEN_FILE) as y:
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    report = edgetl.validate(a.path, iterations=3, warmup=1, write=False)
    assert report.golden["status"] == "passed"


def test_a_top1_flip_within_the_tolerance_still_fails():
    expected = np.array([[1.0, 0.0, -1.0]])
    got = np.array([[0.0, 1.0, -1.0]], dtype=np.float32)
    result = golden._compare(expected, got, "int8")  # 0.1 * max(1, 1): |diff| 1.0 exceeds it anyway
    assert result["max_abs_diff"] == 1.0 and result["flipped"] == 0
    tie = golden._compare(np.array([[1.0, 0.99, -1.0]]), np.array([[0.99, 1.0, -1.0]], dtype=np.float32), "int8")
    assert tie["flipped"] is None  # export's top two were closer than the tolerance: a flip is allowed


def test_the_tolerance_is_the_looser_of_the_artifact_s_precision_and_its_engine_s():
    fp32 = {"precision": "fp32"}
    assert golden.runtime_precision(fp32, "onnxruntime", engine="fp16") == "fp32"  # no engine runs
    assert golden.runtime_precision(fp32, "tensorrt") == "fp32"
    assert golden.runtime_precision({**fp32, "tensorrt": {"precision": "fp16"}}, "tensorrt") == "fp16"  # model.engine
    assert golden.runtime_precision(fp32, "tensorrt", engine="fp16") == "fp16"  # an engine built on a board
    assert golden.runtime_precision({"precision": "int8"}, "tensorrt", engine="fp16") == "int8"
