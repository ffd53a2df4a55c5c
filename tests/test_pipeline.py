"""``edgetl build``: the build-file schema, fingerprints, incremental stages, resume, budgets, offline weights.

Builds run for real on a tiny synthetic dataset (mobilenet_v3_small, weights none, 32 px, 1 epoch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from edgetl.cli import cli
from edgetl.data import make_demo_dataset
from edgetl.errors import ConfigError, WeightsError
from edgetl.pipeline import (
    STATE_FILE,
    BuildResult,
    build,
    config_from_dict,
    dataset_fingerprint,
    load_build_config,
)

TINY = {
    "device": "x86",
    "constraints": {"max_latency_ms": 1000},
    "model": "auto",
    "data": "data",
    "select": {"models": "mobilenet_v3_small"},
    "finetune": {"weights": "none", "strategy": "full", "epochs": 1, "resolution": 32, "batch_size": 16,
                 "device": "cpu"},
    "export": {"precision": "auto", "rounds": 3, "calibration": {"size": 8}, "c_header": True},
    "validate": {"iterations": 5, "warmup": 1},
    "out": "build",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(folder: Path, config: dict, name: str = "pipeline.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tiny_data(root: Path) -> Path:
    return make_demo_dataset(root, num_classes=3, train_per_class=6, val_per_class=3, test_per_class=2, size=32)


def _statuses(result: BuildResult) -> dict[str, str]:
    return {s.name: s.status for s in result.stages}


# --- the schema ----------------------------------------------------------------------------------


def _config_error(tmp_path: Path, config: dict) -> str:
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_build_config(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def test_unknown_key_names_field_and_suggests(tmp_path):
    msg = _config_error(tmp_path, {**TINY, "finetune": {"epoch": 3}})
    assert "finetune.epoch: unknown key" in msg and "did you mean 'epochs'?" in msg


def test_missing_and_wrong_values_are_one_line_each(tmp_path):
    config = {k: v for k, v in TINY.items() if k != "data"}
    assert "data: field required; add `data:" in _config_error(tmp_path, config)
    msg = _config_error(tmp_path, {**TINY, "export": {"precision": "int4"}})
    assert "export.precision" in msg and "'int4'" in msg and "fp32" in msg
    assert "finetune.epochs" in _config_error(tmp_path, {**TINY, "finetune": {"epochs": 0}})
    msg = _config_error(tmp_path, {**TINY, "select": {"precision": "fp32"}, "export": {"precision": "int8"}})
    assert "select.precision" in msg and "export.precision" in msg


@pytest.mark.parametrize(("field", "value", "words"), [
    ("device", "raspbery-pi-5", "did you mean 'raspberry-pi-5'"),
    ("model", "resnt18", "did you mean"),
    ("data", "no-such-folder", "does not exist"),
])
def test_a_bad_name_fails_before_any_stage_naming_the_field(tmp_path, field, value, words):
    _tiny_data(tmp_path / "data")
    path = _write(tmp_path, {**TINY, field: value})
    with pytest.raises(ConfigError) as info:
        build(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {field}: ") and words in msg and "\n" not in msg
    assert not (tmp_path / "build" / STATE_FILE).exists()  # nothing ran


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("device: x86\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:\d+:\d+: invalid YAML"):
        load_build_config(path)


def test_a_section_given_twice_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("device: x86\ndata: data\nfinetune:\n  epochs: 1\nfinetune:\n  epochs: 300\n")
    with pytest.raises(ConfigError) as info:
        load_build_config(path)
    assert str(info.value) == f"{path}:5:1: invalid YAML: duplicate key 'finetune'; remove one of them"


def test_relative_paths_resolve_against_the_build_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "proj", {**TINY, "weights_dir": "w", "device": "profiles/board.yaml",
                                      "export": {"calibration": {"data": "calib"}}})
    cfg = load_build_config(path)
    base = (tmp_path / "proj").resolve()
    assert cfg.data == base / "data" and cfg.out == base / "build" and cfg.weights_dir == base / "w"
    assert cfg.device == str(base / "profiles" / "board.yaml")
    assert cfg.export.calibration.data == base / "calib"
    assert cfg.finetune.weights == "none"
    # a dict resolves against the working directory
    assert config_from_dict(TINY).data == tmp_path.resolve() / "data"


def test_out_folder_with_foreign_files_is_refused(tmp_path):
    _tiny_data(tmp_path / "data")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="did not write"):
        build(_write(tmp_path, TINY))
    assert (tmp_path / "build" / "mine.txt").read_text() == "keep me"


def test_dataset_fingerprints(tmp_path):
    data = _tiny_data(tmp_path / "data")
    image = next((data / "train").rglob("*.png"))
    stat1, content1 = dataset_fingerprint(data, "stat"), dataset_fingerprint(data, "content")
    assert stat1["files"] == 3 * (6 + 3 + 2)
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch: same bytes, new mtime
    assert dataset_fingerprint(data, "stat") != stat1
    assert dataset_fingerprint(data, "content") == content1
    image.write_bytes(image.read_bytes() + b"\0")
    assert dataset_fingerprint(data, "content") != content1
    shutil.copy(image, image.with_name("new.png"))  # a new file changes both
    assert dataset_fingerprint(data, "content")["files"] == stat1["files"] + 1


# --- incremental builds --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build")
    _tiny_data(folder / "data")
    path = _write(folder, TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = build(path)
    finally:
        torch.set_num_threads(threads)
    return path, result


@pytest.mark.slow
def test_first_build_writes_artifact_report_and_state(first_build):
    path, result = first_build
    out = path.parent / "build"
    assert result.passed and result.out == out
    assert _statuses(result) == dict.fromkeys(("select", "finetune", "export", "validate"), "ran")
    assert result.model == "mobilenet_v3_small.IMAGENET1K_V1"
    for name in ("model.onnx", "labels.json", "preprocess.json", "manifest.json", "model_data.h", "validation.json"):
        assert (out / "artifact" / name).is_file(), name
    assert json.loads((out / "artifact" / "labels.json").read_text()) == ["checker", "dots", "stripes"]
    assert result.validation["passed"] and result.validation["accuracy"]["images"] == 6  # data/test
    state = json.loads((out / STATE_FILE).read_text())
    assert {k: v["status"] for k, v in state["stages"].items()} == dict.fromkeys(
        ("select", "finetune", "export", "validate"), "done")
    report = result.report.read_text()
    for heading in ("## 1. Backbone selection", "## 2. Fine-tuning", "## 3. Export and quantization",
                    "## 4. Validation", "## Artifact"):
        assert heading in report, heading
    assert "**Strategy: full**" in report and "int8" in report and "latency budget" in report
    # the test split reports with its count and interval; validation is labelled as what chose the epoch
    test_row = r"\| test accuracy \(chose nothing\) \| [\d.]+% \(\d/6 images; 95% Wilson interval [\d.]+%–[\d.]+%\)"
    assert re.search(test_row, report), report
    assert re.search(r"\| validation accuracy \(chose the epoch\) \| [\d.]+% on 9 images", report)
    assert re.search(r"Per-class accuracy \(test\): checker [\d.]+% of 2, dots", report)
    for png in ("pareto.png", "curves.png", "confusion.png", "candidates.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"(report/{png})" in report
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_unchanged_build_skips_touch_reruns_force_reruns_all(first_build):
    path, first = first_build
    second = build(path)
    assert _statuses(second) == dict.fromkeys(("select", "finetune", "export", "validate"), "skipped")
    assert second.model == first.model and second.validation == first.validation

    image = next((path.parent / "data" / "train").rglob("*.png"))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = build(path)
    assert _statuses(third) == {"select": "skipped", "finetune": "ran", "export": "ran", "validate": "ran"}
    assert third.stage("finetune").reason == "data changed"

    runner = CliRunner()
    res = runner.invoke(cli, ["build", str(path), "--force", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [s["status"] for s in doc["stages"]] == ["ran"] * 4
    assert all(s["reason"] == "--force" for s in doc["stages"])

    res = runner.invoke(cli, ["build", str(path), "--rerun", "validate", "--json"])
    assert res.exit_code == 0, res.output
    assert [s["status"] for s in json.loads(res.stdout)["stages"]] == ["skipped", "skipped", "skipped", "ran"]

    # the same seed on the CPU trains the same weights: export and validate see nothing new
    res = runner.invoke(cli, ["build", str(path), "--rerun", "finetune", "--json"])
    assert res.exit_code == 0, res.output
    assert [s["status"] for s in json.loads(res.stdout)["stages"]] == ["skipped", "ran", "skipped", "skipped"]


@pytest.mark.slow
def test_interrupted_finetune_resumes(first_build):
    path, _ = first_build
    state_file = path.parent / "build" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["stages"]["finetune"]["status"] = "running"  # as if the build died during training
    state_file.write_text(json.dumps(state))
    result = build(path)
    assert result.stage("finetune").status == "resumed"
    assert result.stage("finetune").reason == "last run running"
    assert result.stage("select").status == "skipped"


@pytest.mark.slow
def test_missed_budget_writes_report_and_exits_3(first_build):
    path, _ = first_build
    strict = _write(path.parent, {**TINY, "validate": {**TINY["validate"], "max_latency_ms": 1e-6}}, "strict.yaml")
    res = CliRunner().invoke(cli, ["build", str(strict)])
    assert res.exit_code == 3, res.output
    assert "exceeds the budget of 1e-06 ms" in res.stderr
    report = (path.parent / "build" / "report.md").read_text()
    assert "Result: **FAILED**" in report and "**FAIL**" in report
    # only validate saw a change
    state = json.loads((path.parent / "build" / STATE_FILE).read_text())
    assert state["stages"]["validate"]["summary"]["passed"] is False
    with pytest.raises(Exception) as info:
        build(strict)
    assert info.value.exit_code == 3 and info.value.result.stage("validate").status == "skipped"


@pytest.mark.slow
def test_retraining_clears_only_the_runs_files_and_keeps_the_users(first_build):
    """The build retrains through finetune's restart (RunDir.clear), never by deleting out/run itself."""
    path, _ = first_build
    run = path.parent / "build" / "run"
    (run / "notes.txt").write_text("mine\n")
    stale = run / "last-000099.safetensors"  # a stale resume generation is the run's: cleared
    stale.write_bytes(b"old")
    try:
        result = build(path, force="finetune")
        assert result.stage("finetune").status == "ran"
        assert (run / "notes.txt").read_text() == "mine\n" and not stale.exists()
        assert (run / "model.safetensors").is_file() and (run / "checkpoint.json").is_file()
    finally:
        (run / "notes.txt").unlink()


@pytest.mark.slow
def test_a_run_that_cannot_resume_is_restarted_keeping_the_users_files(first_build):
    path, _ = first_build
    out = path.parent / "build"
    state = json.loads((out / STATE_FILE).read_text())
    state["stages"]["finetune"]["status"] = "running"  # as if the build died during training...
    (out / STATE_FILE).write_text(json.dumps(state))
    (out / "run" / "last.json").write_text("{torn")  # ...and left a resume state that cannot be read
    (out / "run" / "notes.txt").write_text("mine\n")
    said: list[str] = []
    try:
        result = build(path, progress=said.append)
        assert result.stage("finetune").status == "ran"
        assert any("cannot be resumed" in m and "training from the start" in m for m in said), said
        assert (out / "run" / "notes.txt").read_text() == "mine\n"
        assert json.loads((out / "run" / "last.json").read_text())["format"] == "edgetl.checkpoint"
    finally:
        (out / "run" / "notes.txt").unlink()


@pytest.mark.slow
def test_a_run_folder_that_is_not_a_run_is_refused_not_deleted(first_build):
    path, _ = first_build
    run = path.parent / "build" / "run"
    saved = run.with_name("run.saved")
    run.rename(saved)
    try:
        run.mkdir()
        (run / "thesis.tex").write_text("years of work\n")
        with pytest.raises(ConfigError, match="files that edgetl did not write"):
            build(path, force="finetune")
        assert [p.name for p in run.iterdir()] == ["thesis.tex"]
    finally:
        shutil.rmtree(run)
        saved.rename(run)


def test_a_run_killed_while_writing_its_first_files_is_restarted(first_build):
    """A kill after splits.json and during config.yaml's atomic write leaves splits.json and a temporary: the next
    build recognises an edgetl run that cannot resume and trains it again, instead of refusing the folder."""
    path, _ = first_build
    run = path.parent / "build" / "run"
    saved = run.with_name("run.saved")
    shutil.copytree(run, saved)
    try:
        for p in run.iterdir():
            if p.name != "splits.json":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        (run / ".config.yaml.k1ll3d_x.tmp").write_text("model: half-writ")
        build(path, force="finetune")
        assert (run / "config.yaml").is_file() and (run / "model.safetensors").is_file()
        assert not (run / ".config.yaml.k1ll3d_x.tmp").exists()
    finally:
        shutil.rmtree(run)
        saved.rename(run)


def test_nothing_fits_is_a_user_error(tmp_path):
    _tiny_data(tmp_path / "data")
    path = _write(tmp_path, {**TINY, "constraints": {"max_size_mb": 0.1}})
    res = CliRunner().invoke(cli, ["build", str(path)])
    assert res.exit_code == 1
    assert "no model meets the constraints" in res.stderr and "Traceback" not in res.output


# --- offline weights -----------------------------------------------------------------------------


def _fake_weights_dir(folder: Path, name: str = "mobilenet_v3_small") -> Path:
    """A torchvision-format weights file (random values) under torchvision's file name: no download."""
    from edgetl.zoo.catalog import build_architecture, get_card
    from edgetl.zoo.weights import weights_file_name

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    path = folder / weights_file_name(get_card(name))
    torch.save(build_architecture(name).state_dict(), path)
    return path


@pytest.mark.slow
def test_weights_dir_is_used_offline_by_build_and_export(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("EDGETL_WEIGHTS_DIR", raising=False)
    file = _fake_weights_dir(tmp_path / "weights")
    _tiny_data(tmp_path / "data")
    config = {**TINY, "finetune": {**TINY["finetune"], "weights": "imagenet", "strategy": "linear"},
              "export": {"precision": "fp32", "rounds": 2}}
    path = _write(tmp_path, config)

    # an empty offline folder: a one-line error that says how to get the file, and no download
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(tmp_path / "empty"))
    res = CliRunner().invoke(cli, ["build", str(path)])
    assert res.exit_code == 1 and "edgetl weights pull" in res.stderr and file.name in res.stderr

    # --weights-dir overrides the variable
    res = CliRunner().invoke(cli, ["build", str(path), "--weights-dir", str(file.parent), "--json"])
    assert res.exit_code == 0, res.output
    ckpt = json.loads((tmp_path / "build" / "run" / "checkpoint.json").read_text())
    assert ckpt["weights"]["file"] == str(file) and ckpt["weights"]["pretrained"]

    # export of a catalog model finds the same file through $EDGETL_WEIGHTS_DIR
    monkeypatch.setenv("EDGETL_WEIGHTS_DIR", str(file.parent))
    res = CliRunner().invoke(cli, ["export", "mobilenet_v3_small", "--weights", "imagenet", "--resolution", "32",
                                   "--precision", "fp32", "--rounds", "2", "--out", str(tmp_path / "art"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["source"]["weights"]["file"] == str(file)

    # and build fails, offline, when the folder does not hold the file
    with pytest.raises(WeightsError):
        build(path, weights_dir=tmp_path / "empty", force="finetune")
