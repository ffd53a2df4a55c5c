"""The artifact folder: its files, the manifest with their hashes, the C header, and atomic publishing.

Layout::

    ARTIFACT_DIR/
      model.onnx        the model at the chosen precision (input "input" NCHW float32, output "logits")
      labels.json       class names, in output order
      preprocess.json   decode, resize, crop, scale, mean, std, colour order, layout: each once (schema 2)
      golden.npz        a few source images, their prepared inputs and the model's outputs (:mod:`edgetl.export.golden`)
      manifest.json     versions, source, precision, sha256 of every file, accuracy, latency, golden tolerances
      model.engine      only with --tensorrt
      model_data.h      only with --c-header
      manifest.sha256   the digest of the manifest's canonical content (:func:`manifest_digest`)
      manifest.sig      only with --sign-key: a signature over manifest.json (:mod:`edgetl.export.signing`)

The folder is built in a hidden sibling (``.NAME.tmp-XXXX``) and renamed into place, so an
interrupted or failed export leaves no folder that looks finished. An existing folder is either
kept (without ``force``) or swapped out by a rename and then deleted: it is never half-overwritten.
``validation.json`` (written by ``edgetl validate``) is not part of the hashed set.

The manifest is tamper-evident: ``manifest.sha256`` holds the sha256 of its canonical JSON (keys
sorted, no spaces, UTF-8, ASCII escapes) without the record of ``model_data.h``, and the C header
repeats it as ``EDGETL_MANIFEST_SHA256``, so a firmware build can check that the header belongs to
that manifest. A hand-edited manifest (say, ``precision`` changed) no longer matches its digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    label_problem,
    read_json,
    sha256_file,
    umask,
)
from edgetl.data.preprocess import PreprocessSpec
from edgetl.errors import ArtifactError, ConfigError
from edgetl.folders import clean_stale_staging, require_ours, staging_prefix

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
MANIFEST_FILE = "manifest.json"
ENGINE_FILE = "model.engine"
HEADER_FILE = "model_data.h"
VALIDATION_FILE = "validation.json"
DIGEST_FILE = "manifest.sha256"
SIGNATURE_FILE = "manifest.sig"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, PREPROCESS_FILE, MANIFEST_FILE)
ARTIFACT_FORMAT = "edgetl.artifact"
ARTIFACT_VERSION = 1
DIGEST_PLACEHOLDER = "<manifest digest>"
_UNHASHED = (MANIFEST_FILE, VALIDATION_FILE, DIGEST_FILE, SIGNATURE_FILE)

_HEADER_BYTES_PER_LINE = 16


# --- publishing ----------------------------------------------------------------------------------


def check_destination(out: str | os.PathLike[str], force: bool) -> Path:
    """Refuse an existing, non-empty ``out`` unless ``force``, and with ``force`` any folder that is not an
    edgetl artifact (see :func:`edgetl.folders.require_ours`); refuse a file. Returns ``out`` as a Path.

    Staging folders that a killed export left beside ``out`` are removed first.
    """
    out = Path(out).expanduser()
    clean_stale_staging(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it (it is swapped out atomically)")
    return require_ours(out, ("artifact",), "--out", "an artifact")


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
    """A hidden temporary folder beside ``out``; removed if the block raises or nothing publishes it.

    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=staging_prefix(out), dir=out.parent))
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
        else:
            require_ours(out, ("artifact",), "--out", "an artifact")
    if not out.exists():
        os.replace(stage, out)
        _fsync_dir(out.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=staging_prefix(out, "old"), dir=out.parent))
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
    """The content of ``preprocess.json``: every step firmware needs, each fact once (see
    :meth:`edgetl.data.preprocess.PreprocessSpec.to_document`)."""
    return PreprocessSpec.from_preprocess(preprocess, resolution).to_document()


def write_preprocess(folder: Path, preprocess: Any, resolution: int) -> None:
    """``preprocess.json``: see :func:`preprocess_document`."""
    atomic_write_json(folder / PREPROCESS_FILE, preprocess_document(preprocess, resolution))


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def hash_files(folder: Path, skip: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """sha256 and size of every artifact file in ``folder`` except the manifest, its digest and signature, and
    validation.json."""
    return {
        p.name: file_record(p) for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (*_UNHASHED, *skip) and not p.name.startswith(".")
    }


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without the record of ``model_data.h`` (which holds it)."""
    doc = dict(manifest)
    if isinstance(manifest.get("files"), dict):
        doc["files"] = {k: v for k, v in manifest["files"].items() if k != HEADER_FILE}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash the folder's files into ``manifest["files"]``, stamp the digest into the C header (if any), then
    write ``manifest.json`` and ``manifest.sha256`` (last)."""
    manifest = dict(manifest)
    manifest["files"] = hash_files(folder, skip=(HEADER_FILE,))
    digest = manifest_digest(manifest)
    header = folder / HEADER_FILE
    if header.is_file():
        atomic_write_text(header, header.read_text().replace(DIGEST_PLACEHOLDER, digest))
        manifest["files"] = dict(sorted({**manifest["files"], HEADER_FILE: file_record(header)}.items()))
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    atomic_write_text(folder / DIGEST_FILE, digest + "\n")
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
    manifest = read_json(path, ArtifactError, "re-export the artifact")
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is not an edgetl artifact manifest; re-export the artifact")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} lists no files; re-export the artifact")
    return manifest


def read_labels(folder: str | os.PathLike[str], outputs: int | None = None) -> list[str]:
    """Read an artifact's ``labels.json``: a list of distinct class names, each a valid label.

    Args:
        folder: the artifact.
        outputs: the model's number of outputs, when known: the list must be that long.

    Raises:
        ArtifactError: one line naming the file and the fix.
    """
    path = Path(folder) / LABELS_FILE
    labels = read_json(path, ArtifactError, "re-export the artifact")
    if not isinstance(labels, list) or not labels:
        raise ArtifactError(f"{path} must be a list of class names; re-export the artifact")
    for i, label in enumerate(labels):
        problem = label_problem(label)
        if problem:
            raise ArtifactError(f"{path} entry {i}: {problem}; re-export the artifact")
    if len(set(labels)) != len(labels):
        raise ArtifactError(f"{path} names a class twice; re-export the artifact")
    if outputs is not None and outputs != len(labels):
        raise ArtifactError(f"the model in {folder} has {outputs} outputs, {path.name} names {len(labels)} classes; "
                            "re-export the artifact")
    return labels


def verify_files(folder: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the folder's entries, the manifest's digest and every file the manifest lists against its sha256.

    Returns:
        The manifest.

    Raises:
        ArtifactError: a link, a subfolder or a hidden file in the folder; a manifest that does not
            match ``manifest.sha256``; a missing file (``missing file labels.json ...``), a changed one
            (``sha256 mismatch for model.onnx ...``) or one the manifest does not list.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    check_entries(folder)
    check_digest(folder, manifest)
    files: dict[str, Any] = manifest["files"]
    for name in REQUIRED_FILES:
        if name != MANIFEST_FILE and name not in files:
            raise ArtifactError(f"the manifest of {folder} does not list {name}; re-export the artifact")
    for name, record in files.items():
        _verify_file(folder, name, record)
    unlisted = sorted(p.name for p in folder.iterdir() if p.name not in files and p.name not in _UNHASHED
                      and not _own_temporary(p.name))
    if unlisted:
        raise ArtifactError(
            f"{', '.join(unlisted)} in {folder} is not in manifest.json: it was added after export and is not "
            "verified; remove it or re-export the artifact"
        )
    return manifest


def _own_temporary(name: str) -> bool:
    """A temporary file of validate's own atomic write of validation.json (left if it was killed)."""
    return name.startswith(f".{VALIDATION_FILE}.") and name.endswith(".tmp")


def check_entries(folder: Path) -> None:
    """Refuse links, subfolders and hidden files: an artifact is a flat folder of its own regular files."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            raise ArtifactError(
                f"{entry.name} in {folder} is a symbolic link (to {os.readlink(entry)}); an artifact holds only "
                "its own files, so copy the real file in and re-export, or remove the link"
            )
        if entry.is_dir():
            raise ArtifactError(f"{entry.name}/ in {folder} is a subfolder; an artifact holds no folders, "
                                "remove it or re-export the artifact")
        if entry.name.startswith(".") and not _own_temporary(entry.name):
            raise ArtifactError(f"hidden file {entry.name} in {folder} is not part of the artifact; remove it")


def check_digest(folder: Path, manifest: dict[str, Any]) -> None:
    """Compare the manifest with ``manifest.sha256`` (see :func:`manifest_digest`)."""
    path = folder / DIGEST_FILE
    if not path.is_file():
        raise ArtifactError(f"missing file {DIGEST_FILE} in {folder}: the manifest is not protected "
                            "(exported by an older edgetl, or removed); re-export the artifact")
    recorded = path.read_text(encoding="ascii", errors="replace").strip()
    if recorded != manifest_digest(manifest):
        raise ArtifactError(
            f"{MANIFEST_FILE} in {folder} does not match {DIGEST_FILE}: the manifest was edited after export; "
            "re-export the artifact"
        )


def _verify_file(folder: Path, name: Any, record: Any) -> None:
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ArtifactError(f"the manifest of {folder} lists a path outside the artifact: {name}")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ArtifactError(f"the manifest of {folder} has no sha256 for {name} (got {record!r}); "
                            "re-export the artifact")
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"missing file {name} in {folder}; the artifact is incomplete, re-export it")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise ArtifactError(
            f"sha256 mismatch for {name} in {folder}: the file changed after export "
            f"(expected {record['sha256'][:12]}..., got {digest[:12]}...); re-export the artifact"
        )


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
        "/* Input: prepare each image as preprocess.json says (edgetl.data.preprocess): decode to 8-bit RGB (EXIF",
        "   orientation applied, alpha on white, 16-bit / 257), resize the shorter edge (longer edge floored),",
        "   center-crop (offset round((resized - crop) / 2), ties to even), x = (pixel * scale - mean[c]) / std[c]. */",
        f"#define EDGETL_MODEL_INPUT_RANK {len(input_shape)}",
        f"#define EDGETL_MODEL_INPUT_SHAPE {_shape_macro(input_shape)} /* NCHW float32 */",
        f"#define EDGETL_MODEL_OUTPUT_RANK {len(output_shape)}",
        f"#define EDGETL_MODEL_OUTPUT_SHAPE {_shape_macro(output_shape)} /* float32 logits */",
        f"#define EDGETL_MODEL_BATCH_DYNAMIC {dynamic}",
        f"#define EDGETL_MODEL_NUM_CLASSES {num_classes}",
        f"#define EDGETL_MODEL_ONNX_LEN {n}u",
        "/* sha256 of manifest.json's canonical content (see manifest.sha256): the manifest this model belongs to */",
        f'#define EDGETL_MANIFEST_SHA256 "{DIGEST_PLACEHOLDER}"',
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
