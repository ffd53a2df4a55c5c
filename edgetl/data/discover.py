"""Dataset discovery: find a dataset's images and classes and split them (:func:`scan_dataset`).

Three inputs are understood:

* a folder with ``train/`` and ``val/`` (and optionally ``test/``) folders of class folders;
* a single folder of class folders, split into train/val/test by ``test_split`` and ``val_split``
  (stratified per class, seeded; the test split is taken first);
* a CSV file of ``path,label[,split]`` rows (read by :mod:`edgetl.data.csvfile`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgetl._io import label_problem
from edgetl.data.csvfile import read_csv
from edgetl.data.decode import check_images
from edgetl.data.duplicates import unique_content, unique_records
from edgetl.data.options import CHECKS, ON_BAD_IMAGE, check_choice
from edgetl.data.splits import (
    SPLIT_ALIASES,
    SPLITS,
    DatasetSplits,
    Found,
    make_splits,
    require_two_classes,
    sorted_classes,
    validate_splits,
)
from edgetl.errors import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MAX_NAMED_WARNINGS = 20


def scan_dataset(
    data: str | os.PathLike[str],
    val_split: float = 0.2,
    test_split: float | None = None,
    seed: int = 0,
    on_bad_image: str = "skip",
    check: str = "auto",
) -> DatasetSplits:
    """Find the images and classes of a dataset and split them into train/val/test.

    Args:
        data: a folder with ``train/`` and ``val/`` [and ``test/``] folders of class folders, a single
            folder of class folders, or a ``.csv`` file of ``path,label[,split]`` rows.
        val_split: fraction of each class's images held out for validation when no validation set is given.
        test_split: fraction of each class's images (of all of them) held out for the final test before the
            validation split is taken, when no test set is given (``val_split=0.2, test_split=0.1`` gives
            70/20/10). None (auto) holds out :data:`~edgetl.data.splits.AUTO_TEST_FRACTION` when every class
            keeps at least :data:`~edgetl.data.splits.AUTO_TEST_MIN_PER_CLASS` test images, and none otherwise
            or when the dataset comes with its own train and val sets. A dataset's own test set (a ``test/``
            folder, CSV rows of the ``test`` split) is used as given. See :func:`~edgetl.data.splits.make_splits`.
        seed: seed of the stratified split (the split of a class does not depend on the other classes).
        on_bad_image: ``"skip"`` leaves unreadable files out with a warning that names them (and
            records them in :attr:`DatasetSplits.skipped`); ``"error"`` raises :class:`DataError`.
        check: how images are checked at scan time: ``"full"`` decodes each one, ``"header"`` only
            parses headers (a truncated JPEG is then only found, and skipped, while loading),
            ``"none"`` skips the check, ``"auto"`` decodes fully when the dataset is at most
            :data:`~edgetl.data.decode.FULL_CHECK_MAX_BYTES` bytes and checks headers otherwise.

    An image found twice (a link, a repeated CSV row or a byte-identical copy) is refused with two labels
    or in two splits, and otherwise used once or, when edgetl splits it, kept in one split with its
    copies (see :mod:`edgetl.data.duplicates`).

    Raises:
        DataError: a missing path, no images, a single class, an empty class folder, a bad CSV row, an
            image with two labels or in two splits, or (with ``on_bad_image="error"``) an unreadable image.
    """
    check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    check_choice("check", check, CHECKS)
    _check_fractions(val_split, test_split)
    root = Path(data).expanduser()
    found, skipped = _drop_unreadable(unique_records(_read(root)), check, on_bad_image)
    found, together = unique_content(found)
    splits = make_splits(found, val_split, test_split, seed, root, together)
    splits.skipped = skipped
    validate_splits(splits)
    return splits


def _check_fractions(val_split: float, test_split: float | None) -> None:
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"val_split must be in [0, 1), got {val_split}; e.g. 0.2 holds out 20% per class")
    if test_split is not None and not 0.0 <= test_split < 1.0:
        raise DataError(f"test_split must be in [0, 1), got {test_split}; it is a fraction of all the images")
    if test_split is not None and val_split + test_split >= 1.0:
        raise DataError(f"val_split + test_split must be below 1, got {val_split} + {test_split}; "
                        "leave images to train on")


def _read(root: Path) -> Found:
    """Read a CSV file or a folder."""
    if not root.exists():
        raise DataError(
            f"dataset path {root} does not exist; pass a folder of class folders, "
            "a folder with train/ and val/, or a CSV file of path,label"
        )
    if not root.is_file():
        return read_folders(root)
    if root.suffix.lower() not in (".csv", ".tsv", ".txt"):
        raise DataError(f"{root} is a file but not a CSV; pass a folder of class folders or a CSV")
    return read_csv(root)


def _drop_unreadable(found: Found, check: str, on_bad_image: str) -> tuple[Found, list[tuple[Path, str]]]:
    """Check the images (see :func:`check_images`), warn about the bad ones and leave them out."""
    classes, assigned, pool, source = found
    all_paths = [p for recs in assigned.values() for p, _ in recs] + [p for p, _ in pool]
    bad = check_images(all_paths, check, on_bad_image)
    if not bad:
        return found, []
    _warn_skipped(bad)
    bad_set = {p for p, _ in bad}
    assigned = {s: [r for r in recs if r[0] not in bad_set] for s, recs in assigned.items()}
    pool = [r for r in pool if r[0] not in bad_set]
    return (classes, assigned, pool, source), bad


def _warn_skipped(bad: Sequence[tuple[Path, str]]) -> None:
    for path, reason in bad[:_MAX_NAMED_WARNINGS]:
        log.warning("skipping unreadable image %s: %s", path, reason)
    if len(bad) > _MAX_NAMED_WARNINGS:
        log.warning("skipping %d more unreadable images (see the run summary)", len(bad) - _MAX_NAMED_WARNINGS)


# --- folders --------------------------------------------------------------------------------------


def read_folders(root: Path) -> Found:
    """Read a folder with train/val[/test] folders of class folders, or a single tree of class folders."""
    dirs = {d.name.lower(): d for d in _subdirs(root)}
    split_dirs = _split_dirs(dirs)
    others = sorted(set(dirs) - {a for aliases in SPLIT_ALIASES.values() for a in aliases})
    layout = "train" in split_dirs and (not others or "val" in split_dirs or "test" in split_dirs)
    if not layout:
        return _read_class_tree(root)
    if others:
        log.warning("ignoring folders %s in %s: only train/, val/ and test/ are read", others, root)
    return _read_split_dirs(split_dirs)


def _split_dirs(dirs: dict[str, Path]) -> dict[str, Path]:
    """Split name -> the first of its folder names (or aliases, any case) among ``dirs``."""
    split_dirs: dict[str, Path] = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in dirs:
                split_dirs[split] = dirs[alias]
                break
    return split_dirs


def _read_class_tree(root: Path) -> Found:
    """A single tree of class folders: every image goes to the pool that is split later."""
    tree = _class_tree(root, "dataset folder")
    classes = sorted_classes(tree)
    require_two_classes(classes, root)
    pool = [(p, classes.index(c)) for c in classes for p in tree[c]]
    return classes, {s: [] for s in SPLITS}, pool, "split"


def _read_split_dirs(split_dirs: dict[str, Path]) -> Found:
    """train/val[/test] folders: the classes are train's, and another split may not add one."""
    trees = {s: _class_tree(d, f"{s} folder") for s, d in split_dirs.items()}
    classes = sorted_classes(trees["train"])
    require_two_classes(classes, split_dirs["train"])
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


def _visible(name: str) -> bool:
    return not (name.startswith(".") or name.startswith("__"))


def _list_images(folder: Path) -> list[Path]:
    return list(walk_images(folder))


def walk_images(folder: Path) -> Iterator[Path]:
    """Every visible image file under ``folder``, sorted, following links to folders but never in a loop.

    A folder reached twice (a link to a parent, or two links to one folder) is read once; the
    duplicate records that links can still create across classes are caught by
    :func:`~edgetl.data.duplicates.unique_records`.

    Raises:
        DataError: a file or folder name that is not valid UTF-8 (it could not be written to
            ``splits.json`` or shown).
    """
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:  # a dangling link or a folder we may not read
            log.warning("skipping %s: %s", current, exc.strerror or exc)
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.warning("not following %s again: a link leads back to a folder already read", current)
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        for entry in entries:
            if not _visible(entry.name):
                continue
            check_name(Path(entry.path))
            if entry.is_dir(follow_symlinks=True):
                subdirs.append(Path(entry.path))
            elif entry.name.lower().endswith(IMG_EXTENSIONS) and entry.is_file(follow_symlinks=True):
                yield Path(entry.path)
        stack.extend(reversed(subdirs))


def check_name(path: Path) -> None:
    """Refuse a path that is not valid UTF-8 (on POSIX such bytes arrive as surrogate escapes)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"the name {os.fsencode(path)!r} is not valid UTF-8; rename it (e.g. with `convmv`) or move it "
            "out of the dataset"
        ) from None


def _subdirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))
    for d in dirs:
        check_name(d)
    return dirs


def _class_tree(folder: Path, what: str) -> dict[str, list[Path]]:
    """Map class name -> images for a folder of class folders; DataError on an empty class folder."""
    dirs = _subdirs(folder)
    for d in dirs:
        problem = label_problem(d.name)
        if problem:
            raise DataError(f"class folder {d}: {problem}; rename the folder")
    tree = {d.name: _list_images(d) for d in dirs}
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

