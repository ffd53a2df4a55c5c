"""tools/build_artifact.sh and tools/api_example.py, run as a firmware build would run them (subprocess).

Both build the same tiny synthetic pipeline into the same folder: the shell script builds it, the API
example finds every stage up to date. A budget that cannot be met makes both exit 3 without touching
the firmware tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgetl.data import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = {
    "device": "x86",
    "model": "mobilenet_v3_small",
    "data": "data",
    "select": {"models": "mobilenet_v3_small"},
    "finetune": {"weights": "none", "strategy": "full", "epochs": 1, "resolution": 32, "batch_size": 16,
                 "device": "cpu"},
    "export": {"precision": "fp32", "rounds": 3, "c_header": True},
    "validate": {"max_latency_ms": 1000, "iterations": 5, "warmup": 1},
    "out": "build",
}


def cli_env(tmp: Path) -> dict[str, str]:
    """The environment of a firmware build: `edgetl` on PATH (a shim running this Python when the
    console script is not installed), edgetl importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    if shutil.which("edgetl", path=env.get("PATH")) is None:
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "edgetl"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edgetl "$@"\n')
        shim.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("firmware-project")
    make_demo_dataset(root / "data", num_classes=2, train_per_class=6, val_per_class=3, test_per_class=2, size=32)
    (root / "pipeline.yaml").write_text(yaml.safe_dump(PIPELINE))
    strict = {**PIPELINE, "validate": {**PIPELINE["validate"], "max_latency_ms": 1e-6}}
    (root / "strict.yaml").write_text(yaml.safe_dump(strict))
    return root


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=cli_env(cwd), capture_output=True, text=True, timeout=600)


def _assert_readable_modes(tree: Path) -> None:
    """Installed files get the mode open() gives (0666 less the umask), not mkstemp's private 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in tree.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


@pytest.mark.slow
def test_build_artifact_sh_copies_into_firmware_and_stops_on_exit_3(project):
    script = str(ROOT / "tools" / "build_artifact.sh")
    (project / "fw" / "model").mkdir(parents=True)
    (project / "fw" / "model" / "model.engine").write_bytes(b"an older artifact's engine")
    done = _run(["bash", script, "pipeline.yaml", "fw"], project)
    assert done.returncode == 0, done.stderr
    assert not (project / "fw" / "model" / "model.engine").exists()  # model/ is replaced whole
    _assert_readable_modes(project / "fw")
    artifact = project / "build" / "artifact"
    header = project / "fw" / "include" / "model_data.h"
    assert header.read_bytes() == (artifact / "model_data.h").read_bytes()
    for name in ("model.onnx", "labels.json", "preprocess.json", "manifest.json", "validation.json"):
        assert (project / "fw" / "model" / name).read_bytes() == (artifact / name).read_bytes(), name
    assert not (project / "fw" / "model" / "model_data.h").exists()
    assert not [p for p in (project / "fw").rglob(".*") if p.is_file()]  # no temporary files left
    before = {p: p.stat().st_mtime_ns for p in (project / "fw").rglob("*") if p.is_file()}

    missed = _run(["bash", script, "strict.yaml", "fw"], project)
    assert missed.returncode == 3
    assert "misses its budget" in missed.stderr and "firmware not updated" in missed.stderr
    assert {p: p.stat().st_mtime_ns for p in (project / "fw").rglob("*") if p.is_file()} == before

    usage = _run(["bash", script, "pipeline.yaml"], project)
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.slow
def test_api_example_does_the_same_through_python(project):
    example = str(ROOT / "tools" / "api_example.py")
    missed = _run([sys.executable, example, "strict.yaml", "fw-api"], project)
    assert missed.returncode == 3, missed.stderr
    assert "budget missed" in missed.stderr and not (project / "fw-api").exists()

    done = _run([sys.executable, example, "pipeline.yaml", "fw-api"], project)
    assert done.returncode == 0, done.stderr
    artifact = project / "build" / "artifact"
    assert (project / "fw-api" / "include" / "model_data.h").read_bytes() == (artifact / "model_data.h").read_bytes()
    assert (project / "fw-api" / "model" / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()
    _assert_readable_modes(project / "fw-api")
    assert json.loads((project / "fw-api" / "model" / "labels.json").read_text()) == ["checker", "stripes"]

    bad = _run([sys.executable, example, "missing.yaml", "fw-api"], project)
    assert bad.returncode == 1 and bad.stderr.startswith("error: build file missing.yaml does not exist")
