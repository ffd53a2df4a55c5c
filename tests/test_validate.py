"""``edgetl validate``: hashes first, then latency and accuracy against budgets (exit codes 1 and 3)."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import cli
from edgetl.errors import ArtifactError, BudgetExceededError
from edgetl.export import bundle
from edgetl.export.api import export
from edgetl.validate import validate

FAST = ["--iterations", "5", "--warmup", "1"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """resnet18's ImageNet classifier with random weights at 32 px, exported in FP32."""
    out = tmp_path_factory.mktemp("validate") / "artifact"
    return export("resnet18", out, precision="fp32", weights="none", resolution=32, rounds=2, simplify=False)


@pytest.fixture
def copy(artifact, tmp_path):
    dest = tmp_path / "artifact"
    shutil.copytree(artifact.path, dest)
    return dest


def _invoke(*args):
    return CliRunner().invoke(cli, ["validate", *map(str, args)])


def test_validate_passes_and_writes_the_report(copy):
    result = _invoke(copy, *FAST)
    assert result.exit_code == 0, result.output
    assert "sha256 ok" in result.stdout and "passed" in result.stdout
    assert "is not this machine" in result.stdout  # x86-avx2 is a generic profile, not this machine
    report = json.loads((copy / "validation.json").read_text())
    assert report["hashes_ok"] and report["passed"] and report["device"] == "x86-avx2"
    assert report["latency"]["runtime"] == "onnxruntime" and report["latency"]["predicted_ms"] > 0
    lat = report["latency"]
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["max_ms"]
    assert "p90_ms" not in lat and "p99_ms" not in lat and "5 runs are too few" in lat["omitted"]  # 5 runs
    assert report["memory"]["budget_mb"] == 4096
    again = _invoke(copy, *FAST)  # validation.json is not in the hashed set
    assert again.exit_code == 0, again.output


def test_tampered_byte_exits_1(copy):
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    result = _invoke(copy, *FAST)
    assert result.exit_code == 1
    assert "sha256 mismatch for model.onnx" in result.stderr
    assert not (copy / "validation.json").exists()  # nothing ran


@pytest.mark.parametrize("name", ["labels.json", "preprocess.json", "model.onnx", "manifest.json"])
def test_missing_file_exits_1(copy, name):
    (copy / name).unlink()
    result = _invoke(copy, *FAST)
    assert result.exit_code == 1
    assert f"missing file {name}" in result.stderr


def test_latency_budget_miss_exits_3_naming_the_values(copy):
    result = _invoke(copy, *FAST, "--max-latency-ms", "0.0001")
    assert result.exit_code == 3
    report = json.loads((copy / "validation.json").read_text())  # written before exiting
    measured = report["latency"]["judged_ms"]
    assert report["latency"]["pass"] is False and report["latency"]["budget_ms"] == 0.0001
    assert f"latency {measured:.4g} ms (predicted for x86-avx2) exceeds the budget of 0.0001 ms" in result.stderr


def test_a_fast_machine_does_not_pass_a_budget_the_device_misses(copy):
    free = validate(copy, device="raspberry-pi-4", iterations=5, warmup=1, write=False)
    predicted, here = free.latency["predicted_ms"], free.latency["min_ms"]
    assert predicted > here  # a Pi 4 is slower than this machine
    budget = (predicted + here) / 2
    with pytest.raises(BudgetExceededError, match="predicted for raspberry-pi-4"):
        validate(copy, device="raspberry-pi-4", max_latency_ms=budget, iterations=5, warmup=1)


def test_an_unlisted_engine_is_refused_not_run(copy):
    (copy / "model.engine").write_bytes(b"not an engine")
    result = _invoke(copy, *FAST)
    assert result.exit_code == 1
    assert "model.engine" in result.stderr and "not in manifest.json" in result.stderr


def test_a_precision_the_graph_does_not_have_is_refused(tmp_path, artifact):
    """An FP32 model relabelled INT8 is caught twice: by the manifest's digest, and (re-signed) by its graph.

    (A genuine INT8 artifact on a device without INT8: tests/test_bad_inputs.py, validate-int8-on-nano.)
    """
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    dest = tmp_path / "int8-labelled"
    shutil.copytree(artifact.path, dest)
    manifest["precision"] = "int8"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    result = _invoke(dest, "--device", "jetson-nano", *FAST)
    assert result.exit_code == 1 and "does not match manifest.sha256" in result.stderr
    (dest / "manifest.sha256").write_text(bundle.manifest_digest(manifest) + "\n")
    result = _invoke(dest, "--device", "jetson-nano", *FAST)
    assert result.exit_code == 1 and "says int8, but model.onnx is an fp32 graph" in result.stderr


def test_json_is_pure_json(copy):
    result = _invoke(copy, *FAST, "--json", "--max-latency-ms", "100000")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["passed"] and doc["latency"]["pass"] is True and set(doc["files"]) == {
        "model.onnx", "labels.json", "preprocess.json", "golden.npz"}
    assert doc["golden"]["status"] == "passed"


def test_accuracy_with_data(copy, tmp_path):
    labels = json.loads((copy / "labels.json").read_text())
    rng = np.random.default_rng(0)
    for name in labels[:2]:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    report = validate(copy, data=tmp_path / "data", iterations=3, warmup=0)
    assert report.accuracy["images"] == 6 and 0 <= report.accuracy["top1"] <= 100
    assert report.passed


def test_python_api_raises_after_writing(copy):
    with pytest.raises(BudgetExceededError, match="exceeds the budget"):
        validate(copy, max_latency_ms=1e-6, iterations=3, warmup=0)
    assert json.loads((copy / "validation.json").read_text())["passed"] is False
    report = validate(copy, max_latency_ms=1e-6, iterations=3, warmup=0, check=False, write=False)
    assert not report.passed and report.failures
    with pytest.raises(ArtifactError, match="does not exist"):
        validate(copy / "nope")


def test_another_device_shows_the_prediction_and_judges_it(copy):
    from edgetl.runtime.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is available here: the engine-less fallback is not taken")
    report = validate(copy, device="jetson-orin-nano", max_latency_ms=1e6, iterations=3, warmup=0)
    assert report.device == "jetson-orin-nano" and not report.this_machine
    assert report.runtime == "onnxruntime" and any("TensorRT is not available here" in n for n in report.notes)
    lat = report.latency
    assert lat["predicted_for"] == "jetson-orin-nano" and lat["predicted_ms"] > 0
    assert lat["basis"] == "predicted" and lat["judged_on"] == "predicted for jetson-orin-nano"
    assert lat["judged_ms"] == lat["predicted_ms"]
    assert report.memory["budget_mb"] > 0 and report.passed


def test_memory_is_the_sessions_own_whatever_this_process_did_before(artifact):
    """The runtime's memory is measured in a fresh process: heap this process freed earlier (training and
    export, in a build) neither hides the session's growth nor adds to it."""
    from edgetl.validate import MEASURED_FRESH

    first = validate(artifact.path, iterations=3, warmup=0, write=False).memory
    junk = [bytearray(50_000) for _ in range(2000)]  # 100 MB of small blocks, freed but kept by the allocator
    del junk
    again = validate(artifact.path, iterations=3, warmup=0, write=False).memory
    assert first["measured"] == again["measured"] == MEASURED_FRESH
    assert first["runtime_mb"] >= first["model_file_mb"]  # a session holds its weights
    assert again["runtime_mb"] == pytest.approx(first["runtime_mb"], rel=0.1)
