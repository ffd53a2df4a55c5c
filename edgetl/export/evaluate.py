"""Images for the export and validate stages: evaluation sets, calibration samples, batches, top-1.

- The evaluation set of a run, which chooses (the precision, the layers kept in float), is its validation
  split (``splits.json``), never its test split; a run without one chooses on no labelled images (agreement
  with FP32 on calibration images). ``--data DIR`` (a folder of class folders named like the labels)
  replaces it. The test split only reports (:func:`run_split_set`).
- The calibration sample is a stratified sample of the run's training images, or of the images
  under ``--calib-data DIR`` (stratified by their parent folder).
- Every image is decoded and prepared by :mod:`edgetl.data.preprocess`, the preprocessing ``predict`` and
  firmware use.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data import ALPHA_BACKGROUND, IMG_EXTENSIONS
from edgetl.data.decode import try_decode
from edgetl.data.preprocess import PreprocessSpec, prepare
from edgetl.errors import ConfigError, DataError
from edgetl.finetune.metrics import interval_dict
from edgetl.finetune.rundir import RunDir

log = logging.getLogger(__name__)

EVAL_BATCH = 32

Record = tuple[Path, int]


@dataclass
class EvalSet:
    """Labelled images to measure top-1 on.

    Attributes:
        records: ``(path, label)`` pairs; labels index the artifact's classes.
        source: where they came from, e.g. ``val split of RUN_DIR`` or ``DIR``.
    """

    records: list[Record]
    source: str

    def __len__(self) -> int:
        return len(self.records)


def _records(items: Sequence[Sequence[Any]]) -> list[Record]:
    return [(Path(p), int(y)) for p, y in items]


def run_eval_set(run_dir: str | os.PathLike[str]) -> EvalSet | None:
    """The run's validation split, the images that choose; None when it has none.

    Never the test split: that one only reports (see :func:`run_split_set`).
    """
    return run_split_set(run_dir, "val")


def run_split_set(run_dir: str | os.PathLike[str], split: str) -> EvalSet | None:
    """One split (``train``, ``val`` or ``test``) of the run, as ``splits.json`` records it; None when empty."""
    records = _records(RunDir(run_dir).read_splits().get(split) or [])
    return EvalSet(records, f"{split} split of {run_dir}") if records else None


def run_scoring_set(run_dir: str | os.PathLike[str], split: str, classes: Sequence[str]) -> EvalSet:
    """A split of the run an artifact was exported from, to score the artifact on (``validate --run --split``).

    Raises:
        ConfigError: the run's classes are not the artifact's, or the split is empty (for ``test``: how to make one).
        CheckpointError: the run has no readable ``splits.json``.
    """
    splits = RunDir(run_dir).read_splits()
    if list(splits.get("classes") or []) != list(classes):
        raise ConfigError(f"{run_dir} has other classes than the artifact's labels.json; pass the run the artifact "
                          "was exported from")
    found = run_split_set(run_dir, split)
    if found is None and split == "test":
        raise ConfigError(f"{run_dir} has no test split; fine-tune with --test-split FRACTION (e.g. 0.1) to hold one "
                          "out before training")
    if found is None:
        raise ConfigError(f"{run_dir} has no {split} split; pick another with --split")
    return found


def run_train_records(run_dir: str | os.PathLike[str]) -> list[Record]:
    """The run's training records."""
    return _records(RunDir(run_dir).read_splits().get("train") or [])


def folder_eval_set(data: str | os.PathLike[str], classes: Sequence[str]) -> EvalSet:
    """Every image of a folder of class folders (or of its ``val/`` folder), labelled by folder name.

    Raises:
        DataError: the folder does not exist, holds no class folders, or has a class the model lacks.
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"evaluation data {root} is not a folder; pass a folder of class folders")
    for name in ("val", "valid", "validation", "test"):
        if (root / name).is_dir():
            root = root / name
            break
    index = {c: i for i, c in enumerate(classes)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders; put each class's images in a folder named like its label")
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        shown = ", ".join(unknown[:5])
        raise DataError(
            f"{root} has class folders the model does not know ({shown}); folder names must be among the "
            f"{len(classes)} labels in labels.json"
        )
    records: list[Record] = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith("."):
                records.append((path, index[folder.name]))
    if not records:
        raise DataError(f"{root} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return EvalSet(records, str(Path(data)))


def stratified_sample(records: Sequence[Record], size: int, seed: int = 0) -> list[Record]:
    """Up to ``size`` records, taken from each label in turn (shuffled with ``seed``), so classes are balanced."""
    by_label: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        by_label[record[1]].append(record)
    rng = random.Random(seed)
    pools = []
    for label in sorted(by_label):
        pool = list(by_label[label])
        rng.shuffle(pool)
        pools.append(pool)
    sample: list[Record] = []
    depth = 0
    while len(sample) < size and any(depth < len(p) for p in pools):
        for pool in pools:
            if depth < len(pool) and len(sample) < size:
                sample.append(pool[depth])
        depth += 1
    return sample


def folder_calibration_records(data: str | os.PathLike[str]) -> list[Record]:
    """Every image under ``data`` (recursively), labelled by its parent folder for stratification.

    Raises:
        DataError: the folder does not exist or holds no images.
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"calibration data {root} is not a folder; pass a folder of images (--calib-data DIR)")
    parents: dict[Path, int] = {}
    records: list[Record] = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMG_EXTENSIONS and path.is_file() and not path.name.startswith("."):
            records.append((path, parents.setdefault(path.parent, len(parents))))
    if not records:
        raise DataError(f"{root} holds no images ({', '.join(IMG_EXTENSIONS)}) to calibrate INT8 on")
    return records


def image_batches(records: Sequence[Record], preprocess: Any, resolution: int | None = None,
                  batch_size: int = EVAL_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode and prepare images (:mod:`edgetl.data.preprocess`); yield ``(NCHW float32, labels)`` batches.

    ``preprocess`` is a :class:`~edgetl.data.preprocess.PreprocessSpec` or a model card's preprocessing (at
    ``resolution``). Unreadable files are skipped with a warning that names them.
    """
    spec = PreprocessSpec.from_preprocess(preprocess, resolution)
    for start in range(0, len(records), batch_size):
        images, labels = [], []
        for path, label in records[start : start + batch_size]:
            image, reason = try_decode(path, ALPHA_BACKGROUND)
            if image is None:
                log.warning("skipping unreadable image %s: %s", path, reason)
                continue
            images.append(prepare(image, spec))
            labels.append(label)
        if images:
            yield np.stack(images), np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class ImageBatches:
    """Images as NCHW float32 batches, decoded again on each pass and never held together.

    ``len()`` is the number of batches; iterating yields the arrays (without labels).
    """

    records: Sequence[Record]
    preprocess: Any
    resolution: int | None
    batch_size: int = EVAL_BATCH

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (x for x, _ in image_batches(self.records, self.preprocess, self.resolution, self.batch_size))


def random_batches(resolution: int, count: int = 8, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Standard-normal inputs (what normalised images look like to a network), for parity without images."""
    x = np.random.default_rng(seed).standard_normal((count, 3, resolution, resolution), dtype=np.float32)
    return [(x, np.full(count, -1, dtype=np.int64))]


def collect_logits(
    batches: Iterator[tuple[np.ndarray, np.ndarray]] | Sequence[tuple[np.ndarray, np.ndarray]],
    models: dict[str, Callable[[np.ndarray], np.ndarray]],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run every model on every batch (each batch is decoded once); return logits by name and the labels."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in models}
    labels: list[np.ndarray] = []
    for x, y in batches:
        labels.append(y)
        for name, fn in models.items():
            outputs[name].append(np.asarray(fn(x), dtype=np.float32))
    if not labels:
        raise DataError("no image could be read for evaluation; check the images")
    return {k: np.concatenate(v) for k, v in outputs.items()}, np.concatenate(labels)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(logits.argmax(1) == labels))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction (0-1) of inputs whose arg-max class is the same in ``a`` and ``b``."""
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def split_report(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1 on one split, in percent, with its count, 95% Wilson interval and per-class top-1.

    Args:
        logits: ``(images, classes)`` outputs of the model.
        labels: the true class of each image.
        classes: the class names, in the model's output order.

    Returns:
        ``top1``, ``correct``, ``images``, ``top1_ci95`` (``low`` and ``high`` in percent, Wilson),
        ``per_class_top1`` (None for a class with no image) and ``per_class_images``.
    """
    pred = np.asarray(logits).argmax(1)
    labels = np.asarray(labels)
    correct, n = int((pred == labels).sum()), len(labels)
    ci = interval_dict(correct, n)
    per_class: dict[str, float | None] = {}
    per_images: dict[str, int] = {}
    for i, name in enumerate(classes):
        mask = labels == i
        per_images[name] = int(mask.sum())
        per_class[name] = round(100.0 * float(np.mean(pred[mask] == i)), 4) if mask.any() else None
    return {
        "top1": round(100.0 * correct / n, 4) if n else None,
        "correct": correct,
        "images": n,
        "top1_ci95": {**ci, "low": round(100 * ci["low"], 4), "high": round(100 * ci["high"], 4)},
        "per_class_top1": per_class,
        "per_class_images": per_images,
    }


def drop_report(fp32_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                source: str) -> dict[str, Any]:
    """FP32's and a model's top-1 on the same images, and the drop between them, overall and per class.

    Args:
        fp32_logits: the FP32 model's outputs.
        logits: the shipped model's outputs on the same images.
        labels: the true class of each image.
        classes: the class names.
        source: where the images came from (e.g. ``test split of RUN``).

    Returns:
        ``source``, ``fp32`` and ``artifact`` (:func:`split_report` each), ``drop_pts``, ``per_class_drop_pts``
        and ``worst_class`` (the class that lost the most, with its drop), in percentage points.
    """
    fp32, got = split_report(fp32_logits, labels, classes), split_report(logits, labels, classes)
    per_class = {name: None if fp32["per_class_top1"][name] is None
                 else round(fp32["per_class_top1"][name] - got["per_class_top1"][name], 4) for name in classes}
    measured = {k: v for k, v in per_class.items() if v is not None}
    worst = max(measured, key=measured.get) if measured else None
    return {
        "source": source,
        "images": got["images"],
        "fp32": fp32,
        "artifact": got,
        "drop_pts": round(fp32["top1"] - got["top1"], 4) if got["images"] else None,
        "per_class_drop_pts": per_class,
        "worst_class": None if worst is None else {"name": worst, "drop_pts": measured[worst]},
    }
