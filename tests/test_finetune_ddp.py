"""``torchrun --nproc_per_node 2 -m edgetl finetune``: DDP on the CPU with gloo, two real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgetl.data import make_demo_dataset
from edgetl.finetune.rundir import RunDir
from edgetl.zoo.catalog import get_card

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    get_card("mobilenet_v3_small")  # warm the catalog cache the workers share (EDGETL_CACHE_DIR)
    data = make_demo_dataset(tmp_path / "demo", num_classes=4, train_per_class=8, val_per_class=4,
                             test_per_class=2, size=32)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "edgetl", "finetune", "--model", "mobilenet_v3_small", "--data", str(data), "--out", str(out),
        "--weights", "none", "--strategy", "partial", "--epochs", "2", "--resolution", "32", "--batch-size", "8",
        "--device", "cpu", "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # only rank 0 printed: one JSON document
    assert doc["epochs_run"] == 2 and doc["strategy"]["strategy"] == "partial"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # each rank trained on its half (DistributedSampler); the totals are reduced over both ranks
    assert [e["train_images"] for e in metrics["epochs"]] == [32, 32]
    assert metrics["val"]["images"] == 16 and metrics["test"]["images"] == 8
    assert RunDir(out).last_weights.is_file() and RunDir(out).last_optimizer.is_file()
    for name in ("model.safetensors", "checkpoint.json", "last.json", "curves.png",
                 "confusion.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
