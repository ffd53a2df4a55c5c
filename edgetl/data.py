"""Image datasets for fine-tuning: discovery, splits, robust decoding, transforms, loaders, demo data.

Three inputs are understood by :func:`scan_dataset`:

* a folder with ``train/`` and ``val/`` (and optionally ``test/``) folders of class folders;
* a single folder of class folders, split into train/val(/test) by ``val_split`` and ``test_split``
  (stratified per class, seeded);
* a CSV file of ``path,label[,split]`` rows (paths relative to the CSV's folder, optional header).

Every image comes out of :func:`load_rgb` as 8-bit RGB, whatever its mode (grayscale, RGBA, palette,
16-bit, CMYK) and with its EXIF orientation applied. Transparent pixels are composited on **white**
(:data:`ALPHA_BACKGROUND`). A file that cannot be decoded is skipped with a warning that names it and
is recorded in :attr:`DatasetSplits.skipped` (``on_bad_image="skip"``), or raises
:class:`~edgetl.errors.DataError` (``on_bad_image="error"``).

torch and torchvision are only imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from edgetl._io import atomic_write_json
from edgetl.errors import DataError, UnknownNameError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader, Sampler

    from edgetl.catalog import Preprocess

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on this colour (white), like an image viewer on a light page."""

ON_BAD_IMAGE = ("skip", "error")
AUGMENTATIONS = ("none", "light", "strong")
CHECKS = ("auto", "full", "header", "none")
IMBALANCE_WARN_RATIO = 3.0
FULL_CHECK_MAX_BYTES = 64 * 2**20
"""``check="auto"`` decodes every image at scan time when the dataset is at most this many bytes."""

_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
_CSV_PATH_NAMES = ("path", "file", "filename", "filepath", "image", "img", "image_path")
_CSV_LABEL_NAMES = ("label", "class", "target", "category", "class_name")
_CSV_SPLIT_NAMES = ("split", "subset", "set", "fold")
_MAX_NAMED_WARNINGS = 20

Record = tuple[Path, int]


# --- decoding -------------------------------------------------------------------------------------


def to_rgb(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, palette transparency) is composited on ``background``. 16-bit and 32-bit
    integer images are scaled from their full range (``value / 257`` for 16-bit data) instead of being
    clipped at 255 as ``Image.convert`` does; float images in [0, 1] are scaled by 255, other float or
    int ranges are min-max stretched. CMYK and YCbCr go through Pillow's conversion.

    Raises:
        DataError: the mode cannot be converted to RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        base = Image.new("RGB", image.size, background)
        base.paste(image, mask=image.getchannel("A"))
        return base
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _wide_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise DataError(f"images of mode {mode} are not supported ({exc}); convert them to RGB") from exc


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    arr = np.asarray(image)
    if arr.ndim == 3:  # e.g. a 16-bit multi-channel TIFF opened as an array
        arr = arr[..., :3]
    if image.mode.startswith("I;16"):
        out = np.round(arr.astype(np.float64) / 257.0)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0
        elif image.mode != "F" and lo >= 0.0 and hi <= 65535.0:
            out = arr / 257.0  # mode "I" holding 16-bit data (PNG/TIFF)
        else:
            out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    gray = np.clip(np.nan_to_num(out), 0, 255).astype(np.uint8)
    if gray.ndim == 2:
        return Image.fromarray(gray).convert("RGB")
    return Image.fromarray(gray, "RGB")


def _decode(path: str | os.PathLike[str], background: tuple[int, int, int]) -> tuple[Image.Image | None, str]:
    """Decode ``path`` fully; return (image, "") or (None, reason)."""
    try:
        with Image.open(path) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im)
            rgb = to_rgb(oriented, background)
            if rgb is im:
                rgb = im.copy()  # detach from the file handle that the with-block closes
            return rgb, ""
    except DataError as exc:
        return None, str(exc)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def load_rgb(path: str | os.PathLike[str], background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Decode an image file fully and return it as an 8-bit RGB PIL image, EXIF orientation applied.

    Args:
        path: the image file.
        background: the colour transparent pixels are composited on (white by default).

    Raises:
        DataError: the file is missing, truncated, corrupt or not an image; the message names it.
    """
    image, reason = _decode(path, background)
    if image is None:
        raise DataError(f"cannot decode image {path}: {reason}; replace or remove the file")
    return image


def check_image(path: str | os.PathLike[str], full: bool = True) -> str:
    """Return why ``path`` is not a usable image, or "" if it is.

    ``full=False`` only parses the header (PIL ``verify()``, which also checks PNG chunk CRCs); it
    does not notice a truncated JPEG. ``full=True`` decodes the whole image.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if full:
        return _decode(path, ALPHA_BACKGROUND)[1]
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # verify() raises a variety of exceptions on corrupt data
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ""


# --- dataset discovery ----------------------------------------------------------------------------


@dataclass
class DatasetSplits:
    """A dataset resolved to class names and (path, label) records per split.

    Attributes:
        classes: class names; a label is an index into this list.
        train, val, test: the records of each split (``test`` may be empty).
        source: how the splits were made: ``"folders"`` (train/val folders), ``"split"`` (one class-folder
            tree split by ``val_split``/``test_split``) or ``"csv"``.
        skipped: files that were left out because they cannot be decoded, with the reason. Loaders
            built with ``skipped=splits.skipped`` append the files that only fail while training.
        root: the folder or CSV file the dataset was read from.
    """

    classes: list[str]
    train: list[Record]
    val: list[Record]
    test: list[Record]
    source: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    root: Path | None = None

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
            "class_counts": {s: self.class_counts(s) for s in SPLITS if self.records(s)},
            "imbalance_ratio": round(ratio, 3) if math.isfinite(ratio) else None,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": str(p), "reason": r} for p, r in self.skipped],
        }


def scan_dataset(
    data: str | os.PathLike[str],
    val_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 0,
    on_bad_image: str = "skip",
    check: str = "auto",
) -> DatasetSplits:
    """Find the images and classes of a dataset and split them into train/val/test.

    Args:
        data: a folder with ``train/`` and ``val/`` [and ``test/``] folders of class folders, a single
            folder of class folders, or a ``.csv`` file of ``path,label[,split]`` rows.
        val_split: fraction of each class held out for validation when no validation set is given.
        test_split: fraction of the validation set moved to a test set when no test set is given
            (``val_split=0.2, test_split=0.5`` gives 80/10/10).
        seed: seed of the stratified split (the split of a class does not depend on the other classes).
        on_bad_image: ``"skip"`` leaves unreadable files out with a warning that names them (and
            records them in :attr:`DatasetSplits.skipped`); ``"error"`` raises :class:`DataError`.
        check: how images are checked at scan time: ``"full"`` decodes each one, ``"header"`` only
            parses headers (a truncated JPEG is then only found, and skipped, while loading),
            ``"none"`` skips the check, ``"auto"`` decodes fully when the dataset is at most
            :data:`FULL_CHECK_MAX_BYTES` bytes and checks headers otherwise.

    Raises:
        DataError: a missing path, no images, a single class, an empty class folder, a bad CSV row,
            or (with ``on_bad_image="error"``) an unreadable image.
    """
    _check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    _check_choice("check", check, CHECKS)
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"val_split must be in [0, 1), got {val_split}; e.g. 0.2 holds out 20% per class")
    if not 0.0 <= test_split < 1.0:
        raise DataError(f"test_split must be in [0, 1), got {test_split}; it is a fraction of the val set")
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(
            f"dataset path {root} does not exist; pass a folder of class folders, "
            "a folder with train/ and val/, or a CSV file of path,label"
        )
    if root.is_file():
        if root.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise DataError(f"{root} is a file but not a CSV; pass a folder of class folders or a CSV")
        classes, assigned, pool, source = _read_csv(root)
    else:
        classes, assigned, pool, source = _read_folders(root)

    skipped: list[tuple[Path, str]] = []
    all_paths = [p for recs in assigned.values() for p, _ in recs] + [p for p, _ in pool]
    bad = _check_files(all_paths, check, on_bad_image)
    if bad:
        _warn_skipped(bad)
        skipped.extend(bad)
        bad_set = {p for p, _ in bad}
        assigned = {s: [r for r in recs if r[0] not in bad_set] for s, recs in assigned.items()}
        pool = [r for r in pool if r[0] not in bad_set]

    splits = _make_splits(classes, assigned, pool, val_split, test_split, seed, root)
    splits.source, splits.skipped = source, skipped
    _validate_splits(splits)
    return splits


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UnknownNameError(kind, value, choices, "choose one of " + ", ".join(choices))


def _visible(name: str) -> bool:
    return not (name.startswith(".") or name.startswith("__"))


def _list_images(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _visible(f) and f.lower().endswith(IMG_EXTENSIONS))
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _class_tree(folder: Path, what: str) -> dict[str, list[Path]]:
    """Map class name -> images for a folder of class folders; DataError on an empty class folder."""
    tree = {d.name: _list_images(d) for d in _subdirs(folder)}
    for name, images in tree.items():
        if not images:
            raise DataError(
                f"class folder {folder / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images to it or remove it"
            )
    if not tree:
        loose = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]
        if loose:
            raise DataError(
                f"{what} {folder} holds images but no class folders; "
                f"move them into one folder per class: {folder}/<class>/<image>"
            )
        raise DataError(
            f"no images found in {what} {folder}; expected {folder}/<class>/<image>.jpg "
            "(or train/ and val/ folders of class folders, or a CSV file of path,label)"
        )
    return tree


def _read_folders(root: Path) -> tuple[list[str], dict[str, list[Record]], list[Record], str]:
    dirs = {d.name.lower(): d for d in _subdirs(root)}
    split_dirs: dict[str, Path] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in dirs:
                split_dirs[split] = dirs[alias]
                break
    others = sorted(set(dirs) - {a for aliases in _SPLIT_ALIASES.values() for a in aliases})
    layout = "train" in split_dirs and (not others or "val" in split_dirs or "test" in split_dirs)
    if not layout:
        tree = _class_tree(root, "dataset folder")
        classes = _sorted_classes(tree)
        _require_two_classes(classes, root)
        pool = [(p, classes.index(c)) for c in classes for p in tree[c]]
        return classes, {s: [] for s in SPLITS}, pool, "split"

    if others:
        log.warning("ignoring folders %s in %s: only train/, val/ and test/ are read", others, root)
    trees = {s: _class_tree(d, f"{s} folder") for s, d in split_dirs.items()}
    classes = _sorted_classes(trees["train"])
    _require_two_classes(classes, split_dirs["train"])
    for split, tree in trees.items():
        extra = sorted(set(tree) - set(classes))
        if extra:
            raise DataError(
                f"class folder {split_dirs[split] / extra[0]} has no counterpart in {split_dirs['train']}; "
                "every class needs training images: add the folder to train/ or remove it"
            )
    assigned = {s: [] for s in SPLITS}
    for split, tree in trees.items():
        assigned[split] = [(p, classes.index(c)) for c in classes for p in tree.get(c, [])]
    return classes, assigned, [], "folders"


def _sorted_classes(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _require_two_classes(classes: list[str], where: Path) -> None:
    if len(classes) == 1:
        raise DataError(
            f"only one class ('{classes[0]}') found in {where}; a classifier needs at least two: "
            f"add one folder (or CSV label) per class"
        )


def _read_csv(csv_path: Path) -> tuple[list[str], dict[str, list[Record]], list[Record], str]:
    text = csv_path.read_text(encoding="utf-8-sig")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
    if delimiter == "," and ";" in first and "," not in first:
        delimiter = ";"
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    cols = {"path": 0, "label": 1, "split": 2}
    header_seen = False
    rows: list[tuple[int, str, str, str]] = []
    for row in reader:
        line = reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not header_seen and not rows:
            header_seen = True
            lowered = [c.lower() for c in cells]
            if lowered[0] in _CSV_PATH_NAMES or (len(lowered) > 1 and lowered[1] in _CSV_LABEL_NAMES):
                cols = _csv_columns(lowered, csv_path)
                continue
        if len(cells) <= max(cols["path"], cols["label"]):
            raise DataError(
                f"{csv_path} row {line}: expected path,label[,split], got {len(cells)} column(s); fix the row"
            )
        split = cells[cols["split"]] if cols["split"] is not None and cols["split"] < len(cells) else ""
        rows.append((line, cells[cols["path"]], cells[cols["label"]], split))
    if not rows:
        raise DataError(f"{csv_path} has no rows; write one 'path,label' row per image")

    base = csv_path.parent
    labels: list[str] = []
    entries: list[tuple[Path, str, str]] = []
    missing: list[tuple[int, str]] = []
    for line, rel, label, split in rows:
        if not rel or not label:
            raise DataError(f"{csv_path} row {line}: empty {'path' if not rel else 'label'}; fix the row")
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            missing.append((line, rel))
            continue
        key = _split_key(split)
        if key is None:
            raise DataError(
                f"{csv_path} row {line}: unknown split '{split}'; use train, val or test (or leave it empty)"
            )
        labels.append(label)
        entries.append((path, label, key))
    if missing:
        line, rel = missing[0]
        more = f" ({len(missing)} rows in total)" if len(missing) > 1 else ""
        raise DataError(
            f"{csv_path} row {line}: image '{rel}' does not exist{more}; "
            f"paths are relative to {base}: fix or remove the row"
        )
    classes = _sorted_classes(labels)
    _require_two_classes(classes, csv_path)
    index = {c: i for i, c in enumerate(classes)}
    assigned: dict[str, list[Record]] = {s: [] for s in SPLITS}
    pool: list[Record] = []
    for path, label, key in entries:
        (pool if key == "" else assigned[key]).append((path, index[label]))
    return classes, assigned, pool, "csv"


def _csv_columns(header: list[str], csv_path: Path) -> dict[str, int | None]:
    def find(names: Sequence[str]) -> int | None:
        return next((i for i, h in enumerate(header) if h in names), None)

    path_col, label_col = find(_CSV_PATH_NAMES), find(_CSV_LABEL_NAMES)
    if path_col is None or label_col is None:
        raise DataError(f"{csv_path}: the header {header} needs a 'path' and a 'label' column (optionally 'split')")
    return {"path": path_col, "label": label_col, "split": find(_CSV_SPLIT_NAMES)}


def _split_key(value: str) -> str | None:
    value = value.strip().lower()
    if not value:
        return ""
    return next((s for s, aliases in _SPLIT_ALIASES.items() if value in aliases), None)


def _check_files(paths: list[Path], check: str, on_bad_image: str) -> list[tuple[Path, str]]:
    if check == "none" or not paths:
        return []
    full = check == "full"
    if check == "auto":
        total = 0
        for p in paths:
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        full = total <= FULL_CHECK_MAX_BYTES
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        reasons = list(pool.map(lambda p: check_image(p, full=full), paths, chunksize=32))
    bad = [(p, r) for p, r in zip(paths, reasons, strict=True) if r]
    log.info(
        "checked %d images (%s) in %.1f s: %d unreadable",
        len(paths),
        "full decode" if full else "headers",
        time.perf_counter() - start,
        len(bad),
    )
    if bad and on_bad_image == "error":
        path, reason = bad[0]
        more = f" ({len(bad)} bad files in total)" if len(bad) > 1 else ""
        raise DataError(f"cannot decode image {path}: {reason}{more}; replace or remove it, or use on_bad_image='skip'")
    return bad


def _warn_skipped(bad: Sequence[tuple[Path, str]]) -> None:
    for path, reason in bad[:_MAX_NAMED_WARNINGS]:
        log.warning("skipping unreadable image %s: %s", path, reason)
    if len(bad) > _MAX_NAMED_WARNINGS:
        log.warning("skipping %d more unreadable images (see the run summary)", len(bad) - _MAX_NAMED_WARNINGS)


def _stratified_take(records: list[Record], fraction: float, seed: int, classes: list[str], tag: str):
    """Split ``records`` per class: return (rest, taken) with ``round(n * fraction)`` taken per class.

    A class with at least two images keeps at least one on each side. Each class is shuffled by its
    own generator seeded by (seed, tag, class name), so adding a class does not reshuffle the others.
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
        k = round(n * fraction) if fraction > 0 else 0
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        elif n < 2:
            k = 0
        taken.extend(items[:k])
        rest.extend(items[k:])
    return rest, taken


def _make_splits(classes, assigned, pool, val_split, test_split, seed, root) -> DatasetSplits:
    train, val, test = list(assigned["train"]), list(assigned["val"]), list(assigned["test"])
    if pool:
        pool_train, pool_val = _stratified_take(pool, val_split, seed, classes, "val")
        train += pool_train
        val += pool_val
    elif not val and train and val_split > 0:
        log.info("no validation set given: holding out %.0f%% of each training class", 100 * val_split)
        train, val = _stratified_take(train, val_split, seed, classes, "val")
    if not test and test_split > 0 and val:
        val, test = _stratified_take(val, test_split, seed, classes, "test")
    return DatasetSplits(classes, train, val, test, source="", root=root)


def _validate_splits(splits: DatasetSplits) -> None:
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
    ratio = splits.imbalance_ratio("train")
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
    log.info(
        "dataset %s (%s): %d classes, %d train / %d val / %d test images",
        where,
        splits.source,
        splits.num_classes,
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )


# --- transforms -----------------------------------------------------------------------------------


def build_transform(
    preprocess: Preprocess | Any,
    resolution: int | None = None,
    train: bool = False,
    augment: str = "light",
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the image transform for a model from its ModelCard's :class:`~edgetl.catalog.Preprocess`.

    The evaluation transform is resize (shorter side to ``resize_size``), center-crop to
    ``crop_size``, to tensor and normalize, as torchvision's weights transforms do. The training
    transform replaces resize and crop by augmentation:

    * ``"none"``: exactly the evaluation transform (what a feature cache needs);
    * ``"light"``: random resized crop (scale 0.5-1), horizontal flip, rotation up to 10 degrees;
    * ``"strong"``: random resized crop (scale 0.2-1), horizontal flip, rotation up to 20 degrees,
      colour jitter and random erasing.

    Args:
        preprocess: a ``Preprocess`` (or a ``ModelCard``, whose ``preprocess`` is used).
        resolution: crop size to use instead of the card's (resize is scaled with it).
        train: build the training transform.
        augment: ``"none"``, ``"light"`` or ``"strong"`` (training only).
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    _check_choice("augment", augment, AUGMENTATIONS)
    pre = getattr(preprocess, "preprocess", preprocess).at_resolution(resolution)
    try:
        interp = InterpolationMode(pre.interpolation)
    except ValueError:
        interp = InterpolationMode.BILINEAR
    normalize = T.Normalize(mean=list(pre.mean), std=list(pre.std))
    if not train or augment == "none":
        return T.Compose(
            [
                T.Resize(pre.resize_size, interpolation=interp, antialias=True),
                T.CenterCrop(pre.crop_size),
                T.ToTensor(),
                normalize,
            ]
        )
    fill = tuple(round(255 * m) for m in pre.mean)  # rotated-in corners become 0 after normalization
    if augment == "light":
        ops = [
            T.RandomResizedCrop(pre.crop_size, scale=(0.5, 1.0), interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10, interpolation=InterpolationMode.BILINEAR, fill=fill),
            T.ToTensor(),
            normalize,
        ]
    else:
        ops = [
            T.RandomResizedCrop(pre.crop_size, scale=(0.2, 1.0), interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(20, interpolation=InterpolationMode.BILINEAR, fill=fill),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
            T.ToTensor(),
            normalize,
            T.RandomErasing(p=0.25, value=0),
        ]
    return T.Compose(ops)


# --- datasets and loaders -------------------------------------------------------------------------


@dataclass(frozen=True)
class BadSample:
    """What :class:`ImageDataset` returns for an unreadable file under ``on_bad_image="skip"``."""

    path: str
    reason: str


def collate_skip_bad(batch: list[Any]) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Collate ``(tensor, label)`` samples, dropping :class:`BadSample` entries.

    Returns:
        ``(images, labels, bad)`` where ``bad`` lists ``(path, reason)`` of the dropped samples;
        ``images`` and ``labels`` are ``None`` when every sample of the batch was bad.
    """
    from torch.utils.data import default_collate

    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    images, labels = default_collate(good)
    return images, labels, bad


def __getattr__(name: str) -> Any:
    # ImageDataset and ImageLoader subclass torch classes; they are built on first access so that
    # importing this module (to scan a dataset or decode images) does not import torch.
    if name in ("ImageDataset", "ImageLoader"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _torch_classes() -> dict[str, type]:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class ImageDataset(Dataset):
        """A map-style dataset of ``(path, label)`` records that yields ``(transform(image), label)``.

        Under ``on_bad_image="skip"`` an unreadable file yields a :class:`BadSample` instead, which
        :func:`collate_skip_bad` (used by :func:`make_loader`) drops from its batch and reports; under
        ``"error"`` it raises :class:`DataError` naming the file.

        Args:
            records: ``(path, label)`` pairs.
            transform: applied to the RGB PIL image (e.g. from :func:`build_transform`); None keeps the image.
            on_bad_image: ``"skip"`` or ``"error"``.
            background: the colour transparent pixels are composited on.
            seed: if given, each image's random augmentation is drawn from a generator seeded by
                ``(seed, epoch, index)`` (see :meth:`set_epoch`), the same in any worker process and
                with any number of workers; persistent workers never see a reseeded loader, so
                seeding per image is what makes a resumed run draw the same crops.
        """

        __qualname__ = "ImageDataset"

        def __init__(
            self,
            records: Sequence[tuple[str | os.PathLike[str], int]],
            transform: Callable[[Image.Image], Any] | None = None,
            on_bad_image: str = "skip",
            background: tuple[int, int, int] = ALPHA_BACKGROUND,
            seed: int | None = None,
        ) -> None:
            _check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
            self.records = [(str(p), int(y)) for p, y in records]
            self.transform = transform
            self.on_bad_image = on_bad_image
            self.background = background
            self.seed = seed
            # in shared memory, so that worker processes (persistent or not) see set_epoch()
            self._epoch = None if seed is None else torch.zeros((), dtype=torch.int64).share_memory_()

        def set_epoch(self, epoch: int) -> None:
            """Select the epoch whose augmentation :meth:`__getitem__` draws (with ``seed``)."""
            if self._epoch is not None:
                self._epoch.fill_(int(epoch))

        def _transform(self, image: Image.Image, index: int) -> Any:
            if self.seed is None:
                return self.transform(image)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + int(self._epoch) * 7_919 + index * 104_729) % 2**63)
                return self.transform(image)

        def __len__(self) -> int:
            return len(self.records)

        def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
            path, label = self.records[index]
            image, reason = _decode(path, self.background)
            if image is None:
                if self.on_bad_image == "error":
                    raise DataError(f"cannot decode image {path}: {reason}; replace or remove the file")
                return BadSample(path, reason)
            return (self._transform(image, index) if self.transform is not None else image), label

        @property
        def targets(self) -> list[int]:
            """The label of every record, in order."""
            return [y for _, y in self.records]

    class ImageLoader(DataLoader):
        """A DataLoader that yields ``(images, labels)`` and handles unreadable files in the main process.

        Files that fail to decode in a worker come back with their batch; each is warned about once
        (by name) and appended to :attr:`skipped` (shared with ``DatasetSplits.skipped`` when passed),
        or raises :class:`DataError` under ``on_bad_image="error"``.
        """

        __qualname__ = "ImageLoader"

        def __init__(self, *args: Any, on_bad_image: str = "skip", skipped: list | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.on_bad_image = on_bad_image
            self.skipped: list[tuple[Path, str]] = skipped if skipped is not None else []
            self._seen_bad = {str(p) for p, _ in self.skipped}

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for images, labels, bad in super().__iter__():
                for path, reason in bad:
                    self._record_bad(path, reason)
                if images is not None:
                    yield images, labels

        def _record_bad(self, path: str, reason: str) -> None:
            if self.on_bad_image == "error":
                raise DataError(f"cannot decode image {path}: {reason}; replace or remove it, or skip bad images")
            if path in self._seen_bad:
                return
            self._seen_bad.add(path)
            self.skipped.append((Path(path), reason))
            log.warning("skipping unreadable image %s: %s", path, reason)

    return {"ImageDataset": ImageDataset, "ImageLoader": ImageLoader}


def balanced_sampler(
    labels: Sequence[int], num_samples: int | None = None, seed: int = 0
) -> torch.utils.data.WeightedRandomSampler:
    """A sampler that draws every class equally often (weights ``1 / class count``, with replacement)."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    counts = Counter(labels)
    weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=num_samples or len(labels), replacement=True, generator=generator)


def make_loader(
    records: Sequence[tuple[str | os.PathLike[str], int]],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    balance: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
    on_bad_image: str = "skip",
    drop_last: bool = False,
    skipped: list | None = None,
) -> DataLoader:
    """Build a DataLoader over ``(path, label)`` records that survives unreadable files.

    Args:
        records: ``(path, label)`` pairs, e.g. ``splits.train``.
        transform: from :func:`build_transform`.
        batch_size: images per batch (a batch is smaller when it held an unreadable file).
        shuffle: reshuffle every epoch (seeded by ``seed``); ignored with ``balance`` or ``sampler``.
        num_workers: decoding processes; workers are persistent across epochs when > 0. A loader that
            shuffles or samples seeds each image's augmentation from (seed, epoch, index), so the crops
            do not depend on the number of workers and a resumed run draws the same ones.
        device: the training device; memory is pinned when it is a CUDA device.
        balance: draw classes equally often with a :class:`~torch.utils.data.WeightedRandomSampler`.
        sampler: a custom sampler (e.g. a ``DistributedSampler``); exclusive with ``balance``.
        seed: seeds shuffling, the balanced sampler and the workers' augmentation.
        on_bad_image: ``"skip"`` (warn, drop from the batch and append to ``skipped``) or ``"error"``.
        drop_last: drop the last incomplete batch.
        skipped: a list to append skipped files to (pass ``splits.skipped`` for the run summary);
            also available as ``loader.skipped``.

    Raises:
        DataError: ``records`` is empty.
    """
    import torch

    _check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    if not records:
        raise DataError("no images to load: the split is empty; add images or change val_split/test_split")
    if balance and sampler is not None:
        raise ValueError("pass either balance=True or a sampler, not both")
    classes = _torch_classes()
    random_order = shuffle or sampler is not None or balance
    dataset = classes["ImageDataset"](records, transform, on_bad_image="skip", seed=seed if random_order else None)
    if balance:
        sampler = balanced_sampler(dataset.targets, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra.update(persistent_workers=True, prefetch_factor=2)
    return classes["ImageLoader"](
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin,
        drop_last=drop_last,
        generator=generator,
        on_bad_image=on_bad_image,
        skipped=skipped,
        **extra,
    )


# --- synthetic demo dataset -----------------------------------------------------------------------

DEMO_TEXTURES = ("stripes", "checker", "dots", "rings", "waves", "grid")
DEMO_SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "crescent")
DEMO_KINDS = {"textures": DEMO_TEXTURES, "shapes": DEMO_SHAPES}
_DEMO_VERSION = 1
_DEMO_META = "demo.json"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def make_demo_dataset(
    root: str | os.PathLike[str],
    num_classes: int = 4,
    train_per_class: int = 48,
    val_per_class: int = 16,
    test_per_class: int = 0,
    size: int = 64,
    seed: int = 0,
    kind: str = "textures",
) -> Path:
    """Write a small, deterministic class-folder dataset of drawn textures or shapes.

    ``kind="textures"`` (the default) draws the first ``num_classes`` of :data:`DEMO_TEXTURES`
    (stripes, checker, dots, rings, waves, grid): a patch of the texture, in two random colours of
    different brightness, at a random period, phase and orientation, inside a random ellipse or
    quadrilateral. ``kind="shapes"`` draws one of :data:`DEMO_SHAPES` (circle, square, triangle,
    star, ...) in a random colour, size, position, rotation and shear; shapes are much harder to
    learn from scratch and suit pretrained backbones. Both put the object on a noisy two-colour
    gradient background (sometimes striped) with distractor lines, arcs and dots, and add pixel noise
    and occasional blur, so that a small CNN learns the task but does not reach 100%.

    Images are drawn at twice ``size`` and downsampled (anti-aliasing). Each image has its own
    generator seeded by (seed, split, class, index), so the files are identical across runs.

    The layout is ``root/train/<class>/*.png``, ``root/val/<class>/*.png`` and, when
    ``test_per_class > 0``, ``root/test/<class>/*.png``, plus ``root/demo.json`` with the parameters.
    The dataset is built beside ``root`` and renamed into place, so an interrupted run leaves nothing
    that looks finished. If ``root`` already holds a demo dataset with the same parameters it is reused.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: bad parameters, or ``root`` exists and is not an empty folder or a demo dataset.
    """
    root = Path(root).expanduser()
    _check_choice("demo dataset kind", kind, tuple(DEMO_KINDS))
    names = DEMO_KINDS[kind]
    if not 2 <= num_classes <= len(names):
        raise DataError(f"num_classes must be between 2 and {len(names)} for {kind}, got {num_classes}")
    if train_per_class < 1 or val_per_class < 0 or test_per_class < 0:
        raise DataError("train_per_class must be >= 1 and val_per_class, test_per_class >= 0")
    if size < 16:
        raise DataError(f"size must be at least 16 pixels, got {size}")
    classes = list(names[:num_classes])
    meta = {
        "generator": "edgetl.data.make_demo_dataset",
        "version": _DEMO_VERSION,
        "kind": kind,
        "classes": classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "size": size,
        "seed": seed,
    }
    if _demo_meta(root) == meta:
        log.info("reusing the demo dataset in %s", root)
        return root
    if root.exists() and not (root.is_dir() and (not any(root.iterdir()) or _demo_meta(root))):
        raise DataError(f"{root} exists and is not an edgetl demo dataset; choose a new or empty folder")

    draw = _texture_image if kind == "textures" else _shape_image
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for split_id, split in enumerate(SPLITS):
            for class_id, name in enumerate(classes):
                if counts[split] == 0:
                    continue
                folder = staging / split / name
                folder.mkdir(parents=True)
                for i in range(counts[split]):
                    rng = np.random.default_rng([seed, split_id, class_id, i])
                    draw(rng, name, size).save(folder / f"{name}_{i:04d}.png", format="PNG")
        atomic_write_json(staging / _DEMO_META, meta)
        _replace_dir(staging, root, meta)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote a %d-class %s demo dataset to %s", num_classes, kind, root)
    return root


def _demo_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / _DEMO_META).read_text())
    except (OSError, ValueError):
        return None


def _replace_dir(staging: Path, root: Path, meta: dict) -> None:
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old.{os.getpid()}")
        os.replace(root, old)
    try:
        os.replace(staging, root)
    except OSError:
        if _demo_meta(root) != meta:  # unless a concurrent writer produced the same dataset
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, other: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random colour whose luminance differs from ``other``'s by at least ``min_contrast`` (0..1)."""
    for _ in range(50):
        colour = _random_colour(rng)
        if abs(float((colour - other) @ _LUMA)) >= 255 * min_contrast:
            return colour
    return np.full(3, 0.0 if float(other @ _LUMA) > 127 else 255.0, dtype=np.float32)


def _demo_background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A two-colour linear gradient at a random angle, sometimes with faint stripes (a hard negative)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    bg = _random_colour(rng) * (1 - t) + _random_colour(rng) * t
    if rng.random() < 0.4:
        a, freq = rng.uniform(0, np.pi), rng.uniform(4, 12)
        stripes = np.sin(2 * np.pi * freq * (np.cos(a) * xx + np.sin(a) * yy))[..., None]
        bg = bg + stripes * rng.uniform(10, 35) * (rng.random(3) - 0.5).astype(np.float32) * 2
    return bg


def _draw_clutter(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Distractors that belong to no class: lines, small dots and arcs in random colours."""
    draw = ImageDraw.Draw(image)
    side = image.size[0]
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, 4))
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int(rng.integers(1, 4)) * side // 64))
        elif kind == 1:
            x, y = rng.uniform(0, side, 2)
            rad = rng.uniform(0.01, 0.035) * side
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=colour)
        else:
            x, y = rng.uniform(0, side, 2)
            rad = rng.uniform(0.1, 0.3) * side
            start = float(rng.uniform(0, 360))
            box = (float(x - rad), float(y - rad), float(x + rad), float(y + rad))
            draw.arc(box, start, start + float(rng.uniform(40, 120)), fill=colour, width=max(1, side // 64))


def _finish(rng: np.random.Generator, canvas: Image.Image, size: int) -> Image.Image:
    """Downsample to ``size``, blur a quarter of the images slightly and add pixel noise."""
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 18), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _texture_field(rng: np.random.Generator, texture: str, side: int) -> np.ndarray:
    """A 0/1 pattern of ``texture`` at a random period, phase and orientation."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = side * rng.uniform(0.1, 0.22)
    u = (np.cos(theta) * xx + np.sin(theta) * yy) / period + rng.random()
    v = (-np.sin(theta) * xx + np.cos(theta) * yy) / period + rng.random()
    if texture == "stripes":
        field_ = np.mod(u, 1.0) < rng.uniform(0.35, 0.65)
    elif texture == "checker":
        field_ = np.mod(np.floor(u) + np.floor(v), 2) == 1
    elif texture == "dots":
        field_ = np.hypot(np.mod(u, 1.0) - 0.5, np.mod(v, 1.0) - 0.5) < rng.uniform(0.2, 0.32)
    elif texture == "rings":
        cx, cy = rng.uniform(0, side, 2)
        field_ = np.mod(np.hypot(xx - cx, yy - cy) / period, 1.0) < 0.5
    elif texture == "waves":
        wavy = u + rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * v / rng.uniform(1.5, 3.0))
        field_ = np.mod(wavy, 1.0) < 0.5
    elif texture == "grid":
        w = rng.uniform(0.12, 0.22)
        field_ = (np.mod(u, 1.0) < w) | (np.mod(v, 1.0) < w)
    else:  # pragma: no cover - names come from DEMO_TEXTURES
        raise ValueError(texture)
    return field_.astype(np.float32)


def _region_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random ellipse or quadrilateral over a good part of the image, as an (H, W, 1) 0..1 array."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    r = side * rng.uniform(0.5, 0.85)
    cx, cy = rng.uniform(0.3 * side, 0.7 * side, 2)
    if rng.random() < 0.5:
        rx, ry = r * rng.uniform(0.7, 1.0, 2)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.arange(4) * np.pi / 2 + rng.uniform(-0.4, 0.4, 4)
        radii = r * rng.uniform(0.8, 1.1, 4)
        corners = [(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for q, a in zip(radii, angles, strict=True)]
        draw.polygon(corners, fill=255)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def _texture_image(rng: np.random.Generator, texture: str, size: int) -> Image.Image:
    side = 2 * size
    bg = _demo_background(rng, side)
    pattern = _texture_field(rng, texture, side)[..., None]
    c1 = _random_colour(rng)
    c2 = _contrasting_colour(rng, c1, 0.25)
    region = _region_mask(rng, side)
    textured = c1 * (1 - pattern) + c2 * pattern
    canvas = Image.fromarray(np.clip(bg * (1 - region) + textured * region, 0, 255).astype(np.uint8))
    _draw_clutter(rng, canvas, int(rng.integers(0, 4)))
    return _finish(rng, canvas, size)


def _shape_mask(rng: np.random.Generator, shape: str, side: int) -> Image.Image:
    """A white-on-black mask of ``shape`` with random size, position, rotation and shear."""
    r = side * rng.uniform(0.16, 0.32)
    margin = 0.7 * r
    cx, cy = rng.uniform(margin, side - margin, 2)
    theta = rng.uniform(0, 2 * np.pi)
    shear = np.eye(2) + rng.uniform(-0.15, 0.15, (2, 2))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    affine = rot @ shear

    def poly(radii: np.ndarray, angles: np.ndarray, dx: float = 0.0) -> list[tuple[float, float]]:
        pts = np.stack([radii * np.cos(angles) + dx, radii * np.sin(angles)], axis=1) @ affine.T
        return [(float(x + cx), float(y + cy)) for x, y in pts]

    def regular(n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return poly(np.full(n, radius), np.arange(n) * 2 * np.pi / n + phase)

    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.polygon(regular(72, r), fill=255)
    elif shape == "square":
        draw.polygon(regular(4, r, np.pi / 4), fill=255)
    elif shape == "triangle":
        draw.polygon(regular(3, r), fill=255)
    elif shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        draw.polygon(poly(radii, np.arange(10) * np.pi / 5), fill=255)
    elif shape == "cross":
        w = r * rng.uniform(0.3, 0.42)
        xs = np.array([w, w, r, r, w, w, -w, -w, -r, -r, -w, -w])
        ys = np.array([r, w, w, -w, -w, -r, -r, -w, -w, w, w, r])
        draw.polygon(poly(np.hypot(xs, ys), np.arctan2(ys, xs)), fill=255)
    elif shape == "hexagon":
        draw.polygon(regular(6, r), fill=255)
    elif shape == "ring":
        draw.polygon(regular(72, r), fill=255)
        draw.polygon(regular(72, r * rng.uniform(0.45, 0.65)), fill=0)
    elif shape == "crescent":
        draw.polygon(regular(72, r), fill=255)
        radius = np.full(72, r * rng.uniform(0.8, 1.0))
        draw.polygon(poly(radius, np.linspace(0, 2 * np.pi, 72, endpoint=False), r * rng.uniform(0.35, 0.6)), fill=0)
    else:  # pragma: no cover - names come from DEMO_SHAPES
        raise ValueError(shape)
    return mask


def _shape_image(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    side = 2 * size
    bg = _demo_background(rng, side)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    _draw_clutter(rng, canvas, int(rng.integers(1, 5)))
    colour = _contrasting_colour(rng, bg.reshape(-1, 3).mean(0), 0.25)
    canvas.paste(tuple(int(c) for c in colour), mask=_shape_mask(rng, shape, side))
    _draw_clutter(rng, canvas, int(rng.integers(0, 3)))  # some distractors cross the shape
    return _finish(rng, canvas, size)
