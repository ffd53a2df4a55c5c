"""A dataset resolved to classes and train/val/test records, and the seeded stratified split that makes it."""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import DataError, UnknownNameError
from edgetl.options import AUTO_TEST_FRACTION, AUTO_TEST_MIN_PER_CLASS

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
IMBALANCE_WARN_RATIO = 3.0

Record = tuple[Path, int]
Found = tuple[list[str], dict[str, list[Record]], list[Record], str]
"""What a dataset reader finds: (classes, records per named split, records left to split, source)."""


@dataclass
class DatasetSplits:
    """A dataset resolved to class names and (path, label) records per split.

    Attributes:
        classes: class names; a label is an index into this list.
        train, val, test: the records of each split (``test`` may be empty).
        source: how the splits were made: ``"folders"`` (train/val folders), ``"split"`` (one class-folder
            tree split by ``test_split``/``val_split``) or ``"csv"``.
        skipped: files that were left out because they cannot be decoded, with the reason. Loaders
            built with ``skipped=splits.skipped`` append the files that only fail while training.
        root: the folder or CSV file the dataset was read from.
        test_choice: how the test split was made (see :func:`choose_test_split`); None when not recorded.
    """

    classes: list[str]
    train: list[Record]
    val: list[Record]
    test: list[Record]
    source: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    root: Path | None = None
    test_choice: HoldoutChoice | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def records(self, split: str) -> list[Record]:
        """The records of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise UnknownNameError("split", split, SPLITS)
        return getattr(self, split)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Number of images per class in ``split``, in class order (zeros included)."""
        counts = Counter(label for _, label in self.records(split))
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def imbalance_ratio(self, split: str = "train") -> float:
        """Largest over smallest class count in ``split`` (``inf`` if a class has no image there)."""
        counts = list(self.class_counts(split).values())
        if not counts or max(counts) == 0:
            return 1.0
        return math.inf if min(counts) == 0 else max(counts) / min(counts)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary for the run report: sizes, per-class counts, imbalance, skipped files."""
        ratio = self.imbalance_ratio("train")
        return {
            "source": self.source,
            "root": str(self.root) if self.root is not None else None,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "sizes": {s: len(self.records(s)) for s in SPLITS},
            "test_split": self.test_choice.to_dict() if self.test_choice is not None else None,
            "class_counts": {s: self.class_counts(s) for s in SPLITS if self.records(s)},
            "imbalance_ratio": round(ratio, 3) if math.isfinite(ratio) else None,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": str(p), "reason": r} for p, r in self.skipped],
        }



_INTEGER = re.compile(r"-?[0-9]+")


def sorted_classes(names: Iterable[str]) -> list[str]:
    """Unique class names in order: numerically if they are all integers, else alphabetically."""
    names = list(dict.fromkeys(names))
    if names and all(_INTEGER.fullmatch(n) for n in names):  # not str.isdigit: '²' and '--1' are no int()
        return sorted(names, key=int)
    return sorted(names)


def require_two_classes(classes: list[str], where: Path) -> None:
    """Raise :class:`DataError` if ``classes`` (found in ``where``) holds a single class."""
    if len(classes) == 1:
        raise DataError(
            f"only one class ('{classes[0]}') found in {where}; a classifier needs at least two: "
            f"add one folder (or CSV label) per class"
        )


def split_key(value: str) -> str | None:
    """The split a (case-insensitive) name or alias means, "" for an empty name, None for an unknown one."""
    value = value.strip().lower()
    if not value:
        return ""
    return next((s for s, aliases in SPLIT_ALIASES.items() if value in aliases), None)


def _stratified_take(
    records: list[Record], fraction: float, seed: int, classes: list[str], tag: str,
    totals: dict[int, int] | None = None, keep: int = 1, together: Mapping[Path, Path] | None = None,
) -> tuple[list[Record], list[Record]]:
    """Split ``records`` per class: return (rest, taken) with ``round(total * fraction)`` taken per class.

    ``total`` is the class's count in ``totals`` (default: its count in ``records``). A class with more
    than ``keep`` images takes at least one and keeps at least ``keep``; a smaller one takes none. Each
    class is shuffled by its own generator seeded by (seed, tag, class name), so adding a class does not
    reshuffle the others. Copies (``together`` maps a path to its first copy's) are taken or left together.
    """
    by_class: dict[int, list[Record]] = {}
    for rec in records:
        by_class.setdefault(rec[1], []).append(rec)
    rest: list[Record] = []
    taken: list[Record] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda r: str(r[0]))
        random.Random(f"{seed}:{tag}:{classes[label]}").shuffle(items)
        n = len(items)
        total = totals.get(label, n) if totals is not None else n
        k = min(max(round(total * fraction), 1), n - keep) if fraction > 0 and n > keep else 0
        left, took = _take_first(items, k, together or {})
        taken.extend(took)
        rest.extend(left)
    return rest, taken


def _take_first(items: list[Record], k: int, together: Mapping[Path, Path]) -> tuple[list[Record], list[Record]]:
    """(rest, taken): the first ``k`` of ``items``, where a set of copies is taken whole if it fits, else left.

    Without copies this is ``items[k:], items[:k]``.
    """
    if not together:
        return items[k:], items[:k]
    units: dict[Path, list[Record]] = {}
    for rec in items:  # a set of copies stands where its first member comes in the shuffled order
        units.setdefault(together.get(rec[0], rec[0]), []).append(rec)
    rest: list[Record] = []
    taken: list[Record] = []
    for unit in units.values():
        (taken if len(taken) + len(unit) <= k else rest).extend(unit)
    return rest, taken


def _class_totals(*groups: list[Record]) -> dict[int, int]:
    return dict(Counter(label for group in groups for _, label in group))


@dataclass(frozen=True)
class HoldoutChoice:
    """How the test split was made: what was asked, the fraction of all images used, and why.

    Attributes:
        requested: the ``test_split`` asked for (None: auto).
        fraction: the fraction of all images (per class) held out for the test (0: none held out).
        reason: one sentence, for the log, ``splits.json`` and the run summary.
    """

    requested: float | None
    fraction: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """``{"requested": fraction or "auto", "fraction", "reason"}``, as ``splits.json`` records it."""
        return {"requested": "auto" if self.requested is None else self.requested, "fraction": self.fraction,
                "reason": self.reason}


def choose_test_split(found: Found, test_split: float | None) -> HoldoutChoice:
    """The fraction of all images to hold out for the test: ``test_split``, or with None (auto)
    :data:`AUTO_TEST_FRACTION` when every class would keep :data:`AUTO_TEST_MIN_PER_CLASS` test images.

    A dataset that comes with its own test set (a ``test/`` folder, CSV rows of the ``test`` split) keeps
    it as given; with auto, one that comes with its own train/ and val/ sets is left as it is.
    """
    classes, assigned, pool, _ = found
    if assigned["test"]:
        why = f"the dataset's own test set ({len(assigned['test'])} images) is used as given"
        if test_split:
            why += f"; test_split={test_split} is not applied"
        return HoldoutChoice(test_split, 0.0, why)
    if test_split is not None:
        why = f"{test_split:g} of each class's images, as asked" if test_split else "none, as asked (test_split=0)"
        return HoldoutChoice(test_split, test_split, why)
    if not pool and assigned["val"]:
        return HoldoutChoice(None, 0.0, "no test split: the dataset comes with its own train and val sets and "
                                          "no test set (add a test/ folder or CSV test rows, or set test_split)")
    totals = _class_totals(assigned["train"], assigned["val"], pool)
    label, n = min(totals.items(), key=lambda item: (round(item[1] * AUTO_TEST_FRACTION), item[0]))
    if round(n * AUTO_TEST_FRACTION) < AUTO_TEST_MIN_PER_CLASS:
        return HoldoutChoice(None, 0.0, (
            f"no test split: class '{classes[label]}' has {n} images, too few to hold out "
            f"{AUTO_TEST_MIN_PER_CLASS} test images at {AUTO_TEST_FRACTION:g} (set test_split to hold one out anyway)"))
    return HoldoutChoice(None, AUTO_TEST_FRACTION, (
        f"{AUTO_TEST_FRACTION:g} of each class's images held out for the final test (auto: every class keeps at "
        f"least {AUTO_TEST_MIN_PER_CLASS})"))


def make_splits(
    found: Found, val_split: float, test_split: float | None, seed: int, root: Path,
    together: Mapping[Path, Path] | None = None,
) -> DatasetSplits:
    """Split what a reader ``found`` into train/val/test, stratified per class and seeded.

    Records the reader assigned to a split stay there. First, unless the dataset has its own test set,
    the test split (see :func:`choose_test_split`) takes that fraction of each class's images (of all
    of them) from the unassigned records, or from the training records when every record is assigned.
    Then, without a validation set, ``val_split`` of each class's remaining images is held out for
    validation (as a fraction of the images before the test was taken).

    ``together`` maps each byte-identical copy (see :func:`~edgetl.data.duplicates.unique_content`) to
    the path of its first copy; the copies of an image always land in one split, and without copies the
    split is the same as with none given.
    """
    classes, assigned, pool, source = found
    train, val, test = list(assigned["train"]), list(assigned["val"]), list(assigned["test"])
    choice = choose_test_split(found, test_split)
    log.info("test split: %s", choice.reason)
    before = _class_totals(pool or train)
    if choice.fraction > 0:
        keep = 2 if val_split > 0 and (pool or not val) else 1  # leave a training and a validation image
        rest, test = _stratified_take(pool or train, choice.fraction, seed, classes, "test",
                                      _class_totals(train, val, pool), keep, together=together)
        pool, train = (rest, train) if pool else (pool, rest)
    if pool:
        pool_train, pool_val = _stratified_take(pool, val_split, seed, classes, "val", before, together=together)
        train += pool_train
        val += pool_val
    elif not val and train and val_split > 0:
        log.info("no validation set given: holding out %.0f%% of each training class", 100 * val_split)
        train, val = _stratified_take(train, val_split, seed, classes, "val", before, together=together)
    return DatasetSplits(classes, train, val, test, source=source, root=root, test_choice=choice)


def validate_splits(splits: DatasetSplits) -> None:
    """Raise :class:`DataError` if a class has no training image; warn about missing validation images and imbalance."""
    where = splits.root
    counts = splits.class_counts("train")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"class '{empty[0]}' has no training images in {where}"
            + (f" ({len(empty)} classes in total)" if len(empty) > 1 else "")
            + "; add training images for it or remove it"
        )
    if splits.val:
        missing = [c for c, n in splits.class_counts("val").items() if n == 0]
        if missing:
            log.warning("classes without validation images (accuracy does not measure them): %s", ", ".join(missing))
    else:
        log.warning("the validation set is empty: add images or a val/ folder to measure accuracy")
    if splits.test:
        missing = [c for c, n in splits.class_counts("test").items() if n == 0]
        if missing:
            log.warning("classes without test images (the test accuracy does not measure them): %s",
                        ", ".join(missing))
    _warn_imbalance(splits.imbalance_ratio("train"), counts)
    log.info(
        "dataset %s (%s): %d classes, %d train / %d val / %d test images",
        where,
        splits.source,
        splits.num_classes,
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )


def _warn_imbalance(ratio: float, counts: dict[str, int]) -> None:
    if ratio > IMBALANCE_WARN_RATIO:
        big = max(counts, key=counts.__getitem__)
        small = min(counts, key=counts.__getitem__)
        log.warning(
            "class imbalance %.1fx: '%s' has %d training images, '%s' has %d; consider balance=True",
            ratio,
            big,
            counts[big],
            small,
            counts[small],
        )
