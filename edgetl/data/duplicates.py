"""The same image twice in a dataset: one file under two paths.

A file reached twice (a symbolic or hard link, a link to a folder, a repeated CSV row) is found by its
identity, ``(st_dev, st_ino)`` of the file the path leads to (:func:`unique_records`). With two labels the
dataset is refused (an image has one label); in two splits it is refused (it would leak evaluation data
into training); repeated with one label in one split, it is used once, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Sequence
from pathlib import Path

from edgetl.data.splits import Found, Record
from edgetl.errors import DataError

log = logging.getLogger(__name__)

Entry = tuple[str, int, Path]
"""(split, label, path) of a record; the split is "" for the records edgetl splits."""

_SAME_FILE = ("is the same file as", ", through a link or a repeated row")


def file_identity(path: str | os.PathLike[str]) -> Hashable:
    """What makes two paths one file: ``(st_dev, st_ino)`` of what the path leads to (links followed).

    A path that cannot be stat'ed is its own identity (its real path): the file check leaves it out later.
    """
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return info.st_dev, info.st_ino


def _entries(found: Found) -> list[Entry]:
    _, assigned, pool, _ = found
    return [(split, label, path) for split, records in [*assigned.items(), ("", pool)] for path, label in records]


def _rebuild(found: Found, entries: list[Entry]) -> Found:
    classes, assigned, _, source = found
    kept: dict[str, list[Record]] = {split: [] for split in [*assigned, ""]}
    for split, label, path in entries:
        kept[split].append((path, label))
    return classes, {s: kept[s] for s in assigned}, kept[""], source


def unique_records(found: Found) -> Found:
    """Refuse a file that reaches the dataset twice with another label or in another split; drop exact
    repeats (same file, label and split) with a warning.

    Files are compared by :func:`file_identity`, so a symbolic or a hard link to another class's image is
    caught.

    Raises:
        DataError: one file with two labels, or in two splits; the message names both paths.
    """
    entries = _entries(found)
    first: dict[Hashable, Entry] = {}
    kept: list[Entry] = []
    for entry in entries:
        key = file_identity(entry[2])
        if key in first:
            _refuse_conflict(first[key], entry, found[0], _SAME_FILE)
            continue
        first[key] = entry
        kept.append(entry)
    repeats = len(entries) - len(kept)
    if repeats:
        log.warning("%d image(s) are listed more than once (links or repeated rows); each is used once", repeats)
    return _rebuild(found, kept)


def _refuse_conflict(a: Entry, b: Entry, classes: Sequence[str], how: tuple[str, str]) -> None:
    """DataError if ``b``, the same image as ``a``, has another label or is in another split."""
    (split_a, label_a, path_a), (split_b, label_b, path_b) = a, b
    same, through = how
    if label_a != label_b:
        raise DataError(
            f"{path_b} (class '{classes[label_b]}') {same} {path_a} (class '{classes[label_a]}'){through}; "
            "an image has one label: remove one of them"
        )
    if split_a != split_b:
        raise DataError(
            f"{path_b} ({split_b or 'unsplit'}) {same} {path_a} ({split_a or 'unsplit'}){through}; "
            "an image in two splits leaks validation data into training: remove one of them"
        )
