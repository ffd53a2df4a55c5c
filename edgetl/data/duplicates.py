"""The same image twice in a dataset: one file under two paths, or byte-identical copies.

A file reached twice (a symbolic or hard link, a link to a folder, a repeated CSV row) is found by its
identity, ``(st_dev, st_ino)`` of the file the path leads to (:func:`unique_records`). Byte-identical
copies are found by size first and read only when another file has the same size: a hash of the first
:data:`HEAD_BYTES`, then of the whole file (:func:`same_bytes`, :func:`unique_content`). Either way:

* with two labels the dataset is refused: an image has one label;
* in two splits (``train/`` and ``val/`` folders, CSV split columns) it is refused: it would leak
  evaluation data into training;
* repeated in one split the dataset gives, it is used once, with a warning;
* byte-identical copies that edgetl itself splits (the seeded val and test holdout of
  :func:`~edgetl.data.splits.make_splits`) all go to one split together, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgetl._io import sha256_file
from edgetl.data.decode import MAX_IMAGE_BYTES
from edgetl.data.splits import Found, Record
from edgetl.errors import DataError

log = logging.getLogger(__name__)

HEAD_BYTES = 64 << 10
"""Files of one size are first told apart by a hash of this many leading bytes, then by a hash of all of them."""

Entry = tuple[str, int, Path]
"""(split, label, path) of a record; the split is "" for the records edgetl splits."""

_SAME_FILE = ("is the same file as", ", through a link or a repeated row")
_SAME_BYTES = ("is a byte-identical copy of", "")


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


def unique_content(found: Found) -> tuple[Found, dict[Path, Path]]:
    """Refuse byte-identical copies with two labels or in two splits; use copies in one given split once.

    Copies that edgetl splits itself (records without a split) are all kept, and returned as a map from each
    later copy to the first one, for :func:`~edgetl.data.splits.make_splits` to keep them in one split.
    Each case is one warning with the count.

    Raises:
        DataError: two copies with two labels, or in two splits; the message names both paths.
    """
    entries = _entries(found)
    dropped: dict[int, int] = {}  # a copy in a given split -> the entry it copies
    together: dict[Path, Path] = {}
    for group in same_bytes([path for _, _, path in entries]):
        head = entries[group[0]]
        for index in group[1:]:
            _refuse_conflict(head, entries[index], found[0], _SAME_BYTES)
            if head[0]:
                dropped[index] = group[0]
            else:
                together[entries[index][2]] = head[2]
    if dropped:
        index, first = next(iter(dropped.items()))
        log.warning("%d image(s) are byte-identical copies of another image in the same split "
                    "(e.g. %s is a copy of %s); each image is used once", len(dropped), entries[index][2],
                    entries[first][2])
    if together:
        copy, first = next(iter(together.items()))
        log.warning("%d image(s) are byte-identical copies of another image of their class (e.g. %s is a copy of %s); "
                    "the copies of an image are kept together in one split", len(together), copy, first)
    return _rebuild(found, [e for i, e in enumerate(entries) if i not in dropped]), together


def same_bytes(paths: Sequence[str | os.PathLike[str]]) -> list[list[int]]:
    """Groups of two or more of ``paths`` (as indices, in order) that hold the same bytes.

    Only a file of the same size as another is read: first its first :data:`HEAD_BYTES`, then, if another
    file still matches, all of it (sha256, in chunks). Empty files, files over
    :data:`~edgetl.data.decode.MAX_IMAGE_BYTES`, and files that are not regular or cannot be read are
    never grouped.
    """
    start = time.perf_counter()
    by_size: dict[int, list[int]] = {}
    for index, path in enumerate(paths):
        try:
            info = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and 0 < info.st_size <= MAX_IMAGE_BYTES:
            by_size.setdefault(info.st_size, []).append(index)
    groups = [group for group in by_size.values() if len(group) > 1]
    compared = sum(len(group) for group in groups)
    groups = _split_by(_split_by(groups, lambda i: _head_digest(paths[i])), lambda i: _full_digest(paths[i]))
    if compared:
        log.info("compared %d images of equal size by content in %.1f s: %d with a copy", compared,
                 time.perf_counter() - start, sum(len(group) for group in groups))
    return sorted(groups)


def _split_by(groups: list[list[int]], key: Callable[[int], str | None]) -> list[list[int]]:
    """Each group split by ``key`` (computed in threads; None: the file is left out); parts of two or more."""
    members = [index for group in groups for index in group]
    if not members:
        return []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        keys = dict(zip(members, pool.map(key, members), strict=True))
    parts: list[list[int]] = []
    for group in groups:
        split: dict[str, list[int]] = {}
        for index in group:
            if keys[index] is not None:
                split.setdefault(keys[index], []).append(index)
        parts.extend(part for part in split.values() if len(part) > 1)
    return parts


def _head_digest(path: str | os.PathLike[str]) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read(HEAD_BYTES)).hexdigest()
    except OSError:
        return None


def _full_digest(path: str | os.PathLike[str]) -> str | None:
    """The sha256 of the whole file; a file of at most :data:`HEAD_BYTES` was read whole by :func:`_head_digest`."""
    try:
        return sha256_file(path) if os.path.getsize(path) > HEAD_BYTES else "head"
    except OSError:
        return None


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
