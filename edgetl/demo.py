"""``edgetl demo``: the whole pipeline on a synthetic dataset, offline, on the CPU, in a few minutes.

The demo writes ``OUT/data/`` (:func:`edgetl.demo_data.make_demo_dataset`: 4 texture classes, 64 px) and
``OUT/pipeline.yaml`` (a build file to copy and edit), then runs :func:`edgetl.pipeline.build` on it:
select among the ResNet-1x entries that fit a size budget, train the winner from random weights
(nothing is downloaded), export FP32 and INT8 candidates, validate the shipped one on this machine.
The build lands in ``OUT/build/`` with ``report.md``. Running the demo again skips every stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from edgetl._io import atomic_write_text
from edgetl.demo_data import make_demo_dataset
from edgetl.errors import ConfigError
from edgetl.folders import require_ours
from edgetl.profiles import family_device

DEMO_PIPELINE = "pipeline.yaml"
DEMO_DATA = "data"
DEMO_BUILD = "build"

_HEADER = """\
# A build file written by `edgetl demo`: the whole pipeline on a synthetic dataset, on the CPU, offline.
# Copy it, point `data:` at your images and `device:` at your board, then run `edgetl build pipeline.yaml`.
# Relative paths resolve against this file's folder.
"""


def demo_device() -> str:
    """The built-in profile closest to this machine's CPU family (x86-64: x86-avx2; Arm: raspberry-pi-5)."""
    return family_device()


def demo_config(epochs: int = 8, device: str | None = None) -> dict[str, Any]:
    """The demo's build file as a dict (what ``OUT/pipeline.yaml`` holds)."""
    return {
        "device": device or demo_device(),
        # ResNet-101 and -152 are over 150 MB in fp32: the size budget leaves ResNet-18.
        "constraints": {"max_latency_ms": 50, "max_size_mb": 50},
        "model": "auto",
        "select": {"models": "resnet1*"},
        "data": DEMO_DATA,
        "finetune": {
            # Random weights (no download): train every layer, all at the backbone's learning rate.
            "weights": "none", "strategy": "full", "layer_decay": 1.0, "lr": 0.003,
            "epochs": epochs, "resolution": 64, "batch_size": 32, "device": "cpu",
        },
        "export": {"precision": "auto", "calibration": {"method": "minmax", "size": 64}, "c_header": True,
                   "rounds": 20},
        # p50 measured on this machine, which may be busy and is not the profile's CPU: a loose budget
        "validate": {"max_latency_ms": 250, "iterations": 50},
        "out": DEMO_BUILD,
    }


def write_demo(out: str | os.PathLike[str], epochs: int = 8, train_per_class: int = 48,
               device: str | None = None) -> Path:
    """Write the demo dataset and build file into ``out``; return the build file's path.

    Raises:
        ConfigError: ``out`` holds files that are not an edgetl demo.
    """
    out = require_ours(out, ("demo",), "--out", "the demo")
    if epochs < 1 or train_per_class < 2:
        raise ConfigError("the demo needs --epochs >= 1 and --train-per-class >= 2")
    make_demo_dataset(out / DEMO_DATA, num_classes=4, train_per_class=train_per_class,
                      val_per_class=max(2, train_per_class // 3), test_per_class=max(2, train_per_class // 6),
                      size=64, seed=0, kind="textures")
    path = out / DEMO_PIPELINE
    text = _HEADER + yaml.safe_dump(demo_config(epochs, device), sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def run_demo(
    out: str | os.PathLike[str] = "edgetl-demo",
    *,
    epochs: int = 8,
    train_per_class: int = 48,
    device: str | None = None,
    force: bool = False,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
    progress_bars: bool = False,
) -> Any:
    """Run the demo: write ``OUT/data`` and ``OUT/pipeline.yaml``, then build into ``OUT/build``.

    Args:
        out: the demo folder.
        epochs: training epochs.
        train_per_class: training images per class (validation gets a third, test a sixth).
        device: the target profile (default: :func:`demo_device`).
        force: rerun every stage.
        check, progress, progress_bars: as in :func:`edgetl.pipeline.build`.

    Returns:
        The :class:`~edgetl.pipeline.BuildResult`.
    """
    from edgetl.pipeline import build

    path = write_demo(out, epochs=epochs, train_per_class=train_per_class, device=device)
    if progress is not None:
        progress(f"demo: wrote {path} and the synthetic dataset in {path.parent / DEMO_DATA}")
    return build(path, force=force, check=check, progress=progress, progress_bars=progress_bars)
