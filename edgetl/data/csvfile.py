"""Reading a dataset from a CSV file of ``path,label[,split]`` rows (paths relative to the CSV's folder).

The delimiter is a comma, a tab (``.tsv`` files, or a tab and no comma in the first line) or a
semicolon; a header row naming the columns is optional; blank rows and ``#`` comments are ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgetl._io import MAX_LABEL_CHARS, label_problem
from edgetl.data.decode import file_problem
from edgetl.data.splits import SPLITS, Found, Record, require_two_classes, sorted_classes, split_key
from edgetl.errors import DataError

_PATH_NAMES = ("path", "file", "filename", "filepath", "image", "img", "image_path")
_LABEL_NAMES = ("label", "class", "target", "category", "class_name")
_SPLIT_NAMES = ("split", "subset", "set", "fold")

Row = tuple[int, str, str, str]
"""(line number, path, label, split) as written in the file."""


def read_csv(csv_path: Path) -> Found:
    """Read the classes and records of a CSV dataset; rows with a split are assigned to it.

    Raises:
        DataError: a file that is not UTF-8, no rows, a row with too few columns or an empty cell, an
            unknown split, a header without path and label columns, a single class, or images that do not
            exist. (A file listed twice with two labels or in two splits is refused by the caller,
            :func:`edgetl.data.duplicates.unique_records`.)
    """
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = csv_path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{csv_path} line {line} is not UTF-8 (byte {exc.object[exc.start]:#04x}); save the CSV as UTF-8"
        ) from None
    rows = _rows(text, _delimiter(csv_path, text), csv_path)
    return _group(_resolve(rows, csv_path), csv_path)


def _delimiter(csv_path: Path, text: str) -> str:
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
    if delimiter == "," and ";" in first and "," not in first:
        delimiter = ";"
    return delimiter


def _rows(text: str, delimiter: str, csv_path: Path) -> list[Row]:
    """The data rows, with the columns a header (if the first row is one) names."""
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    cols = {"path": 0, "label": 1, "split": 2}
    header_seen = False
    rows: list[Row] = []
    for row in _checked(reader, csv_path):
        line = reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not header_seen and not rows:
            header_seen = True
            lowered = [c.lower() for c in cells]
            if lowered[0] in _PATH_NAMES or (len(lowered) > 1 and lowered[1] in _LABEL_NAMES):
                cols = _columns(lowered, csv_path)
                continue
        if len(cells) <= max(cols["path"], cols["label"]):
            raise DataError(
                f"{csv_path} row {line}: expected path,label[,split], got {len(cells)} column(s); fix the row"
            )
        split = cells[cols["split"]] if cols["split"] is not None and cols["split"] < len(cells) else ""
        rows.append((line, cells[cols["path"]], cells[cols["label"]], split))
    if not rows:
        raise DataError(f"{csv_path} has no rows; write one 'path,label' row per image")
    return rows


def _checked(reader: Any, csv_path: Path) -> Iterator[list[str]]:
    """The rows of ``reader``; the csv module's own error (a cell over its 131072-character limit) as a DataError."""
    try:
        yield from reader
    except csv.Error as exc:
        raise DataError(f"{csv_path} row {reader.line_num}: {exc}; fix the row (a class name is at most "
                        f"{MAX_LABEL_CHARS} characters)") from None


def _columns(header: list[str], csv_path: Path) -> dict[str, int | None]:
    def find(names: Sequence[str]) -> int | None:
        return next((i for i, h in enumerate(header) if h in names), None)

    path_col, label_col = find(_PATH_NAMES), find(_LABEL_NAMES)
    if path_col is None or label_col is None:
        raise DataError(f"{csv_path}: the header {header} needs a 'path' and a 'label' column (optionally 'split')")
    return {"path": path_col, "label": label_col, "split": find(_SPLIT_NAMES)}


def _resolve(rows: list[Row], csv_path: Path) -> list[tuple[Path, str, str]]:
    """(image path, label, split key) per row; all the missing images are counted in one error."""
    base = csv_path.parent
    entries: list[tuple[Path, str, str]] = []
    missing: list[tuple[int, str, str]] = []
    for line, rel, label, split in rows:
        if not rel or not label:
            raise DataError(f"{csv_path} row {line}: empty {'path' if not rel else 'label'}; fix the row")
        problem = label_problem(label)
        if problem:
            raise DataError(f"{csv_path} row {line}: {problem}; fix the label")
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else base / path
        problem = file_problem(path)
        if problem:
            missing.append((line, rel, problem))
            continue
        key = split_key(split)
        if key is None:
            raise DataError(
                f"{csv_path} row {line}: unknown split '{split}'; use train, val or test (or leave it empty)"
            )
        entries.append((path, label, key))
    if missing:
        line, rel, problem = missing[0]
        more = f" ({len(missing)} rows in total)" if len(missing) > 1 else ""
        relative = "" if Path(rel).expanduser().is_absolute() else f"paths are relative to {base}: "
        raise DataError(f"{csv_path} row {line}: image '{rel}' {problem}{more}; {relative}fix or remove the row")
    return entries


def _group(entries: list[tuple[Path, str, str]], csv_path: Path) -> Found:
    """Number the classes and put each record in its split, or in the pool when the row names none."""
    classes = sorted_classes(label for _, label, _ in entries)
    require_two_classes(classes, csv_path)
    index = {c: i for i, c in enumerate(classes)}
    assigned: dict[str, list[Record]] = {s: [] for s in SPLITS}
    pool: list[Record] = []
    for path, label, key in entries:
        (pool if key == "" else assigned[key]).append((path, index[label]))
    return classes, assigned, pool, "csv"
