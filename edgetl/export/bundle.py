"""The artifact folder: its files, the manifest with their hashes, the C header, and atomic publishing.

Layout::

    ARTIFACT_DIR/
      model.onnx        the model at the chosen precision (input "input" NCHW float32, output "logits")
      labels.json       class names, in output order
      preprocess.json   resize, crop, mean, std, layout, colour order
      manifest.json     versions, source, precision, sha256 of every file, accuracy, latency
      model.engine      only with --tensorrt
      model_data.h      only with --c-header

The folder is built in a hidden sibling (``.NAME.tmp-XXXX``) and renamed into place, so an
interrupted or failed export leaves no folder that looks finished. An existing folder is either
kept (without ``force``) or swapped out by a rename and then deleted: it is never half-overwritten.
``validation.json`` (written by ``edgetl validate``) is not part of the hashed set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import atomic_path, atomic_write_json, atomic_write_text, sha256_file, umask
from edgetl.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
MANIFEST_FILE = "manifest.json"
ENGINE_FILE = "model.engine"
HEADER_FILE = "model_data.h"
VALIDATION_FILE = "validation.json"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, PREPROCESS_FILE, MANIFEST_FILE)
ARTIFACT_FORMAT = "edgetl.artifact"
ARTIFACT_VERSION = 1

_HEADER_BYTES_PER_LINE = 16


# --- publishing ----------------------------------------------------------------------------------


def check_destination(out: str | os.PathLike[str], force: bool) -> Path:
    """Refuse an existing, non-empty ``out`` unless ``force``; refuse a file. Returns ``out`` as a Path."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it (it is swapped out atomically)")
    return out


def check_not_inside(out: Path, inputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse an ``out`` that is, or holds, one of the inputs: replacing it would delete them."""
    target = out.expanduser().resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        if src == target or target in src.parents:
            raise ConfigError(f"--out {out} holds {what} ({path}); writing the artifact there would replace it, "
                              "choose another folder")


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``out``; removed if the block raises or nothing publishes it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path, force: bool) -> None:
    """Move the finished ``stage`` folder to ``out``.

    An existing ``out`` is renamed aside first (``force``), the stage renamed into place, and the old
    folder deleted; if the second rename fails the old folder is put back.
    """
    _default_permissions(stage)
    _fsync_dir(stage)
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif not force:
            raise ConfigError(f"{out} already exists; pass --force to replace it")
    if not out.exists():
        os.replace(stage, out)
        _fsync_dir(out.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(old, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes the staging folder private (0700); a published artifact gets the umask's mode.

    Its files already have theirs: they are written through :func:`edgetl._io.atomic_path`.
    """
    folder.chmod(0o777 & ~umask())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` atomically (temporary name, fsync, rename)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


# --- the small files -----------------------------------------------------------------------------


def write_labels(folder: Path, classes: Sequence[str]) -> None:
    """``labels.json``: the class names, in output order."""
    atomic_write_json(folder / LABELS_FILE, list(classes))


def preprocess_document(preprocess: Any, resolution: int) -> dict[str, Any]:
    """The content of ``preprocess.json``: every step firmware needs, in order, with explicit values."""
    pre = preprocess.at_resolution(resolution) if hasattr(preprocess, "at_resolution") else preprocess
    d = pre.to_dict()
    return {
        "resize": {"size": d["resize_size"], "edge": "shorter", "interpolation": d["interpolation"],
                   "antialias": True},
        "crop": {"size": [d["crop_size"], d["crop_size"]], "mode": "center"},
        "scale": d["scale"],
        "mean": d["mean"],
        "std": d["std"],
        "color_order": d["color_order"],
        "layout": d["layout"],
        "dtype": "float32",
        "input_shape": [1, 3, d["crop_size"], d["crop_size"]],
        "formula": "x = (pixel * scale - mean[c]) / std[c], pixels in 0..255, channels in color_order",
        # the plain fields again, in the names of edgetl.catalog.Preprocess, to rebuild the transform
        "preprocess": d,
    }


def write_preprocess(folder: Path, preprocess: Any, resolution: int) -> None:
    """``preprocess.json``: see :func:`preprocess_document`."""
    atomic_write_json(folder / PREPROCESS_FILE, preprocess_document(preprocess, resolution))


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every artifact file in ``folder`` except the manifest and validation.json."""
    skip = {MANIFEST_FILE, VALIDATION_FILE}
    return {
        p.name: file_record(p) for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in skip and not p.name.startswith(".")
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash the folder's files into ``manifest["files"]`` and write ``manifest.json`` (last)."""
    manifest = dict(manifest)
    manifest["files"] = hash_files(folder)
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


# --- reading and verifying -----------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an artifact's manifest.

    Raises:
        ArtifactError: no folder, no manifest, or a manifest that is not an edgetl artifact's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; pass the --out folder of `edgetl export`")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"missing file {MANIFEST_FILE} in {folder}; it is not a complete edgetl artifact")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the artifact") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is not an edgetl artifact manifest; re-export the artifact")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} lists no files; re-export the artifact")
    return manifest


def verify_files(folder: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256 (and the required files exist).

    Returns:
        The manifest.

    Raises:
        ArtifactError: a missing file (``missing file labels.json ...``) or a changed one
            (``sha256 mismatch for model.onnx ...``).
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    files: dict[str, Any] = manifest["files"]
    for name in REQUIRED_FILES:
        if name != MANIFEST_FILE and name not in files:
            raise ArtifactError(f"the manifest of {folder} does not list {name}; re-export the artifact")
    for name, record in files.items():
        path = folder / name
        if Path(name).name != name:
            raise ArtifactError(f"the manifest of {folder} lists a path outside the artifact: {name}")
        if not path.is_file():
            raise ArtifactError(f"missing file {name} in {folder}; the artifact is incomplete, re-export it")
        digest = sha256_file(path)
        if digest != record.get("sha256"):
            raise ArtifactError(
                f"sha256 mismatch for {name} in {folder}: the file changed after export "
                f"(expected {str(record.get('sha256'))[:12]}..., got {digest[:12]}...); re-export the artifact"
            )
    unlisted = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                      and p.name not in files and p.name not in (MANIFEST_FILE, VALIDATION_FILE))
    if unlisted:
        raise ArtifactError(
            f"{', '.join(unlisted)} in {folder} is not in manifest.json: it was added after export and is not "
            "verified; remove it or re-export the artifact"
        )
    return manifest


# --- C header ------------------------------------------------------------------------------------

def c_array_body(data: bytes, per_line: int = _HEADER_BYTES_PER_LINE, indent: str = "  ") -> str:
    """``data`` as C initializer lines (``0x12,0x34,...``), from ``bytes.hex`` laid out by NumPy.

    A 40 MB model takes about a second, where a per-byte Python loop takes about a minute.
    """
    if not data:
        return ""
    arr = np.frombuffer(data, dtype=np.uint8)
    rows = -(-len(arr) // per_line)
    pad = rows * per_line - len(arr)
    lead = np.frombuffer(indent.encode(), dtype=np.uint8)
    width = len(lead) + 5 * per_line + 1
    out = np.empty((rows, width), dtype=np.uint8)
    out[:, : len(lead)] = lead
    out[:, -1] = ord("\n")
    cells = np.zeros((rows * per_line, 5), dtype=np.uint8)
    cells[: len(arr), 0], cells[: len(arr), 1], cells[: len(arr), 4] = ord("0"), ord("x"), ord(",")
    cells[: len(arr), 2:4] = np.frombuffer(data.hex().encode("ascii"), dtype=np.uint8).reshape(-1, 2)
    out[:, len(lead) : -1] = cells.reshape(rows, 5 * per_line)
    text = out.tobytes()
    if pad:  # the last row is shorter: cut its unused cells
        text = text[: len(text) - 1 - 5 * pad] + b"\n"
    return text[:-1].decode("ascii")


def _shape_macro(shape: Sequence[int | str]) -> str:
    return "{" + ", ".join(str(d if isinstance(d, int) else 1) for d in shape) + "}"


def c_header(onnx_bytes: bytes, input_shape: Sequence[int | str], output_shape: Sequence[int | str],
             num_classes: int, precision: str, model: str) -> str:
    """The text of ``model_data.h``: the ONNX bytes as an aligned C array, its length and I/O shapes.

    A dynamic batch dimension is given as 1 in the shape macros (and flagged by ``..._BATCH_DYNAMIC``).
    """
    guard = "EDGETL_MODEL_DATA_H_"
    dynamic = int(not isinstance(input_shape[0], int))
    n = len(onnx_bytes)
    lines = [
        f"/* Generated by edgetl export: {model}, {precision}. Do not edit. */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <stddef.h>",
        "#if !defined(__cplusplus) && (!defined(__STDC_VERSION__) || __STDC_VERSION__ < 202311L)",
        "#include <stdalign.h>",
        "#endif",
        "",
        '#define EDGETL_MODEL_PRECISION "' + precision + '"',
        '#define EDGETL_MODEL_INPUT_NAME "input"',
        '#define EDGETL_MODEL_OUTPUT_NAME "logits"',
        f"#define EDGETL_MODEL_INPUT_RANK {len(input_shape)}",
        f"#define EDGETL_MODEL_INPUT_SHAPE {_shape_macro(input_shape)} /* NCHW float32 */",
        f"#define EDGETL_MODEL_OUTPUT_RANK {len(output_shape)}",
        f"#define EDGETL_MODEL_OUTPUT_SHAPE {_shape_macro(output_shape)} /* float32 logits */",
        f"#define EDGETL_MODEL_BATCH_DYNAMIC {dynamic}",
        f"#define EDGETL_MODEL_NUM_CLASSES {num_classes}",
        f"#define EDGETL_MODEL_ONNX_LEN {n}u",
        "",
        "alignas(16) static const unsigned char edgetl_model_onnx[] = {",
        c_array_body(onnx_bytes) if n else "  0x00,",
        "};",
        "static const size_t edgetl_model_onnx_len = EDGETL_MODEL_ONNX_LEN;",
        "",
        f"#endif /* {guard} */",
        "",
    ]
    return "\n".join(lines)


def write_c_header(folder: Path, onnx_path: Path, input_shape: Sequence[int | str],
                   output_shape: Sequence[int | str], num_classes: int, precision: str, model: str) -> None:
    """Write ``model_data.h`` for ``onnx_path`` into ``folder`` (atomically)."""
    text = c_header(onnx_path.read_bytes(), input_shape, output_shape, num_classes, precision, model)
    atomic_write_text(folder / HEADER_FILE, text)
