"""RunDir, the owner of the fine-tuning run folder: its files, its JSON readers, and who uses it.

One real run (mobilenet_v3_small, random weights, 32 px, 1 epoch on the tiny demo dataset) is made once;
tests that damage a run work on a copy.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetl.data import make_demo_dataset, scan_dataset
from edgetl.errors import CheckpointError, EdgetlError
from edgetl.export.evaluate import run_eval_set, run_train_records
from edgetl.finetune.rundir import RunDir
from edgetl.folders import folder_kind

PACKAGE = Path(__file__).resolve().parent.parent / "edgetl"
SEED = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir-data") / "demo"
    return make_demo_dataset(root, num_classes=3, train_per_class=6, val_per_class=3, test_per_class=2, size=32)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    import torch

    from edgetl.finetune.api import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("rundir") / "run"
        result = finetune("mobilenet_v3_small", demo, out, strategy="partial", unfreeze=1, epochs=1, weights="none",
                          resolution=32, batch_size=8, device="cpu", progress=False, seed=SEED)
    finally:
        torch.set_num_threads(threads)
    return out, result


@pytest.fixture
def copy_of_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


def test_a_finished_run_is_recognised_and_its_files_are_the_ones_named(trained):
    out, result = trained
    run = RunDir(str(out))
    assert run.is_run() and folder_kind(out) == "run"
    assert run.can_resume() and run.has_checkpoint()
    named = [run.config, run.splits, run.weights, run.checkpoint, run.last_weights, run.last_optimizer, run.last,
             run.metrics, run.curves, run.confusion]
    on_disk = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {p.name for p in named} == on_disk
    assert all(p.parent == out for p in named)
    assert result.checkpoint == run.weights


def test_the_outputs_of_a_finished_run_are_on_disk(trained):
    out, result = trained
    outputs = RunDir(out).outputs()
    assert [p.name for p in outputs] == ["model.safetensors", "checkpoint.json", "metrics.json", "splits.json"]
    assert all(p.is_file() for p in outputs)
    assert json.loads(outputs[2].read_text())["val_accuracy"] == result.val_accuracy


def test_splits_read_back_equal_what_training_used(demo, trained):
    out, result = trained
    splits = RunDir(out).read_splits()
    used = scan_dataset(demo, seed=SEED)
    assert splits["classes"] == list(used.classes) == list(result.classes)
    for name in ("train", "val", "test"):
        assert splits[name] == [[str(p), int(y)] for p, y in getattr(used, name)], name
    # export's evaluation and calibration images come from the same file
    assert run_train_records(out) == [(Path(p), y) for p, y in splits["train"]]
    assert run_eval_set(out).records == [(Path(p), y) for p, y in splits["val"]]


def test_the_checkpoint_state_is_read_as_json_and_matches_the_loaded_model(trained):
    from edgetl.finetune.api import load_trained_model

    out, result = trained
    state = RunDir(out).read_checkpoint()
    assert state["classes"] == list(result.classes)
    assert state["format"] == "edgetl.checkpoint" and state["weights_file"] == RunDir(out).weights.name
    assert load_trained_model(out).checkpoint == state
    assert RunDir(out).read_last()["epoch"] == 1


def test_a_run_without_its_checkpoint_is_refused_naming_the_file(copy_of_run):
    from edgetl.predict import open_source

    run = RunDir(copy_of_run)
    run.checkpoint.unlink()
    with pytest.raises(EdgetlError, match=r"checkpoint\.json does not exist") as info:
        run.read_checkpoint()
    assert isinstance(info.value, CheckpointError) and str(run.checkpoint) in str(info.value)
    with pytest.raises(CheckpointError) as info:
        open_source(copy_of_run)
    assert str(run.checkpoint) in str(info.value)
    assert run.is_run()  # config.yaml with splits.json still marks a run, one that cannot be loaded


def test_a_damaged_checkpoint_state_is_refused(copy_of_run):
    run = RunDir(copy_of_run)
    run.checkpoint.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON") as info:
        run.read_checkpoint()
    assert str(run.checkpoint) in str(info.value)
    run.checkpoint.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="is not an edgetl checkpoint"):
        run.read_checkpoint()
    run.checkpoint.write_text(json.dumps({"format": "edgetl.checkpoint", "version": 99}))
    with pytest.raises(CheckpointError, match="newer edgetl"):
        run.read_checkpoint()


def test_missing_or_damaged_splits_are_refused_naming_the_file(copy_of_run):
    run = RunDir(copy_of_run)
    run.splits.write_text("[1, 2")
    with pytest.raises(CheckpointError, match="is not valid JSON") as info:
        run.read_splits()
    assert str(run.splits) in str(info.value)
    run.splits.unlink()
    with pytest.raises(CheckpointError, match="is missing") as info:
        run_eval_set(copy_of_run)
    assert str(run.splits) in str(info.value)


def test_folders_that_are_not_runs(tmp_path):
    assert not RunDir(tmp_path / "missing").is_run()
    empty = RunDir(tmp_path)
    assert not empty.is_run() and not empty.can_resume() and not empty.has_checkpoint()
    empty.config.write_text("model: x\n")
    assert not empty.is_run()  # config.yaml alone is not a run
    empty.last.write_text("{}")
    assert empty.is_run() and empty.can_resume()


def test_a_run_killed_as_it_started_is_still_a_run_and_an_atomic_temporary_is_edgetls(tmp_path):
    from edgetl.folders import RUN_SPLITS_FORMAT, folder_kind, is_empty

    started, users = tmp_path / "started", tmp_path / "users"
    for folder in (started, users):
        folder.mkdir()
    (started / "splits.json").write_text(json.dumps({"format": RUN_SPLITS_FORMAT, "classes": ["a", "b"]}))
    (users / "splits.json").write_text(json.dumps({"classes": ["a", "b"]}))
    assert folder_kind(started) == "run" and RunDir(started).is_run()
    assert folder_kind(users) is None
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".splits.json.a1b2c3d4.tmp").write_text("{")
    assert is_empty(tmp_path / "killed")
    (tmp_path / "killed" / "notes.tmp").write_text("mine")
    assert not is_empty(tmp_path / "killed")


def test_a_run_dir_is_a_value(tmp_path):
    assert RunDir(str(tmp_path)) == RunDir(tmp_path) and hash(RunDir(str(tmp_path))) == hash(RunDir(tmp_path))
    assert RunDir("runs/a").path == Path("runs", "a") and RunDir("runs/a").weights == Path("runs/a/model.safetensors")
    with pytest.raises(AttributeError):
        RunDir(tmp_path).path = tmp_path  # frozen


def test_importing_rundir_does_not_import_torch():
    code = "import sys, edgetl.finetune.rundir; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


RUN_FILE_NAMES = {"config.yaml", "splits.json", "model.safetensors", "model.{token}.safetensors", "checkpoint.json",
                  "last.safetensors", "last.optim.safetensors", "last-{gen:06d}.safetensors",
                  "last-{gen:06d}.optim.safetensors", "last.json", "metrics.json", "curves.png", "confusion.png",
                  ".feature_cache"}
OWNERS = {PACKAGE / "folders.py", PACKAGE / "finetune" / "rundir.py"}


def _code_strings(tree: ast.AST) -> set[str]:
    """String constants of a module's code, docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_run_file_names_are_defined_only_by_their_owners():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in OWNERS:
            continue
        literal = _code_strings(ast.parse(path.read_text(encoding="utf-8"))) & RUN_FILE_NAMES
        found += [f"{path.relative_to(PACKAGE.parent)}: {name}" for name in sorted(literal)]
    assert not found, "run file names outside RunDir and folders.py: " + ", ".join(found)
