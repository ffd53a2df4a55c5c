"""Golden outputs: a few reference inputs in the artifact, and the shipped model's outputs on them.

Export writes ``golden.npz`` (hashed in the manifest like every other file) holding:

- ``image_0`` ... ``image_{N-1}``: the source images as decoded 8-bit RGB arrays (``H x W x 3`` uint8), up to
  :data:`MAX_INPUTS` validation images (a stratified, seeded choice), or deterministic synthetic images
  when export had no labelled images (the manifest says which);
- ``inputs``: those images prepared by :mod:`edgetl.data.preprocess` (``N x 3 x H x W`` float32);
- ``outputs``: ``model.onnx``'s logits on ``inputs`` with ONNX Runtime on the CPU, the runtime export measured.

The manifest's ``golden`` section records the tolerance of each precision and the top-1 index of each input.
:func:`check` (run by ``validate`` first, and by ``predict --check``) proves two things before anything is
measured:

1. **The preprocessing is export's:** preparing the stored images with the artifact's own ``preprocess.json``
   reproduces ``inputs`` within :data:`PREPROCESS_ATOL`. (Re-running ``inputs`` alone could not catch a
   changed ``preprocess.json``.)
2. **The runtime computes export's model:** the device's runtime reproduces ``outputs`` within the
   precision's tolerance, ``atol * max(1, logit scale)`` where the scale is the largest ``|logit|`` stored,
   with the same top-1 class (unless export's top two logits are closer than the tolerance).

The file is read with ``allow_pickle=False``: it holds plain arrays, never objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl._io import atomic_path
from edgetl.data.preprocess import PreprocessSpec, decode, prepare, read_spec
from edgetl.errors import ArtifactError, DataError
from edgetl.export import bundle

log = logging.getLogger(__name__)

GOLDEN_FILE = "golden.npz"
MAX_INPUTS = 4
"""Reference inputs stored: enough to exercise the model on distinct images, small enough to ship."""
MAX_SOURCE_EDGE = 2
"""A stored source image's shorter edge is at most this many times the resize size (larger photos are
downscaled once, before the reference tensors are computed from the downscaled copy)."""
PREPROCESS_ATOL = 1e-5
"""Largest difference allowed between the stored inputs and the artifact's preprocessing of the stored images.
The preprocessing is deterministic numpy and Pillow: the same spec gives identical tensors."""
TOLERANCES: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-1}
"""Allowed ``|got - expected|`` per logit, as a fraction of ``max(1, largest |logit| stored)``, by the precision that
runs. fp32: another CPU, thread count or kernel order changes sums by a few float32 ulps (~1e-6 relative), so
1e-4 is loose for honest runtimes and tight for a changed weight. fp16: 10-bit mantissa (ulp 1e-3 relative), and
device kernels (TensorRT, ARM) may accumulate in fp16 where ONNX Runtime's CPU upcasts; errors add up over
the layers, so 1e-2 (export's own fp16 parity limit against PyTorch is 1e-3 + 1e-2 * scale). int8: another
integer kernel (VNNI or not, ARM, TensorRT's calibration) can round an activation one quantization step
differently, and a step is ~1% of its range; 10% of the logit scale, with top-1 agreement required too."""


class GoldenMismatchError(ArtifactError):
    """The artifact's golden inputs or outputs are not reproduced here (exit 1)."""


def _synthetic_images(spec: PreprocessSpec, count: int, seed: int = 0) -> list[np.ndarray]:
    """Deterministic RGB images (smooth gradients plus seeded noise) a little larger than the resize size."""
    rng = np.random.default_rng(seed)
    h = w = max(spec.resize_size, *spec.crop_size) + 8
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for i in range(count):
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 255.0
        noisy = np.roll(base, i, axis=-1) + rng.normal(0.0, 24.0, size=(h, w, 3))
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return images


def _source_image(path: Any, spec: PreprocessSpec) -> np.ndarray | None:
    """A file decoded as training decodes it, downscaled when much larger than the model needs; None when
    unreadable."""
    try:
        image = decode(path)
    except DataError as exc:  # an unreadable file is skipped, as the evaluation skips it
        log.warning("not using %s as a golden input: %s", path, str(exc).splitlines()[0])
        return None
    limit = MAX_SOURCE_EDGE * max(spec.resize_size, *spec.crop_size)
    if min(image.size) > limit:
        ratio = limit / min(image.size)
        image = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                             Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def choose_images(paths: Sequence[Any], spec: PreprocessSpec) -> tuple[list[np.ndarray], list[str]]:
    """Up to :data:`MAX_INPUTS` readable images of ``paths`` (in the order given), as uint8 RGB arrays, and
    their file names."""
    images, names = [], []
    for path in paths:
        array = _source_image(path, spec)
        if array is not None:
            images.append(array)
            names.append(Path(path).name)
        if len(images) == MAX_INPUTS:
            break
    return images, names


def write_golden(folder: Path, spec: PreprocessSpec, forward: Callable[[np.ndarray], np.ndarray], precision: str,
                 paths: Sequence[Any] = (), source: str = "") -> dict[str, Any]:
    """Write ``golden.npz`` into ``folder`` and return the manifest's ``golden`` section.

    Args:
        folder: the artifact's staging folder.
        spec: the artifact's preprocessing.
        forward: the shipped model on a ``1 x 3 x H x W`` batch, returning logits (ONNX Runtime CPU).
        precision: the shipped model's precision.
        paths: candidate image files, in a deterministic order (e.g. a stratified sample of the validation split).
        source: where ``paths`` come from, for the manifest.

    Returns:
        The ``golden`` section: file, count, source, runtime, tolerances, logit scale and top-1 indices.
    """
    images, names = choose_images(paths, spec)
    synthetic = not images
    if synthetic:
        images, names = _synthetic_images(spec, MAX_INPUTS), []
    inputs = np.stack([prepare(Image.fromarray(im), spec) for im in images])
    outputs = np.concatenate([np.asarray(forward(inputs[i:i + 1]), dtype=np.float32) for i in range(len(inputs))])
    arrays = {f"image_{i}": im for i, im in enumerate(images)}
    with atomic_path(folder / GOLDEN_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, inputs=inputs, outputs=outputs, **arrays)
    scale = float(np.abs(outputs).max())
    return {
        "file": GOLDEN_FILE,
        "inputs": len(inputs),
        "synthetic": synthetic,
        "source": ("deterministic synthetic images (seeded gradients and noise): export had no labelled images"
                   if synthetic else f"{', '.join(names)} from {source or 'the evaluation images'}"),
        "runtime": "onnxruntime CPUExecutionProvider",
        "precision": precision,
        "logit_scale": round(scale, 6),
        "tolerance_rule": "|got - expected| <= tolerance[precision] * max(1, logit_scale) per logit, and the same "
                          "top-1 unless export's top two logits are closer than that",
        "tolerances": dict(TOLERANCES),
        "preprocess_atol": PREPROCESS_ATOL,
        "top1": [int(i) for i in outputs.argmax(1)],
    }


def _load(folder: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(folder / GOLDEN_FILE, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise GoldenMismatchError(f"cannot read {GOLDEN_FILE} in {folder}: {str(exc).splitlines()[0]}; "
                                  "re-export the artifact") from None
    count = len(arrays.get("inputs", ()))
    if "outputs" not in arrays or any(f"image_{i}" not in arrays for i in range(count)) or not count:
        raise GoldenMismatchError(f"{GOLDEN_FILE} in {folder} lacks inputs, outputs or images; re-export the "
                                  "artifact")
    return arrays


def _check_preprocessing(folder: Path, arrays: dict[str, np.ndarray]) -> float:
    """Prepare the stored images with the artifact's preprocess.json; return the largest difference."""
    spec = read_spec(folder / bundle.PREPROCESS_FILE)
    worst = 0.0
    for i, stored in enumerate(arrays["inputs"]):
        got = prepare(Image.fromarray(arrays[f"image_{i}"].astype(np.uint8)), spec)
        if got.shape != stored.shape:
            raise GoldenMismatchError(
                f"golden input {i}: preprocess.json gives a {'x'.join(map(str, got.shape))} tensor, export stored "
                f"{'x'.join(map(str, stored.shape))}: preprocess.json differs from export's; re-export the artifact")
        diff = np.abs(got.astype(np.float64) - stored)
        at = np.unravel_index(int(diff.argmax()), diff.shape)
        if diff[at] > PREPROCESS_ATOL:
            raise GoldenMismatchError(
                f"golden input {i}: preparing its image with preprocess.json gives {got[at]:.6g} at "
                f"[c={at[0]}, y={at[1]}, x={at[2]}] where export stored {stored[at]:.6g} (tolerance "
                f"{PREPROCESS_ATOL:g}): preprocess.json differs from export's; re-export the artifact")
        worst = max(worst, float(diff[at]))
    return worst


def _compare(expected: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    """The largest difference, the tolerance, and the first input whose top-1 changed (or None)."""
    scale = max(1.0, float(np.abs(expected).max()))
    limit = TOLERANCES.get(precision, TOLERANCES["int8"]) * scale
    diff = np.abs(got.astype(np.float64) - expected)
    i, j = (int(v) for v in np.unravel_index(int(diff.argmax()), diff.shape))
    flipped = None
    for n, (e, g) in enumerate(zip(expected, got)):  # noqa: B905 (the board runs Python 3.8; shapes checked)
        top2 = np.sort(e)[-2:] if len(e) > 1 else np.array([-np.inf, e[0]])
        if int(e.argmax()) != int(g.argmax()) and top2[1] - top2[0] > limit:
            flipped = n
            break
    return {"max_abs_diff": float(diff[i, j]), "at": [i, j], "expected": float(expected[i, j]),
            "got": float(got[i, j]), "tolerance": limit, "flipped": flipped}


def check(folder: str | os.PathLike[str], manifest: dict[str, Any], forward: Callable[[np.ndarray], np.ndarray],
          precision: str | None = None, runtime: str = "onnxruntime") -> dict[str, Any]:
    """Re-run an artifact's golden inputs (files already verified against the manifest) on ``forward``.

    Args:
        folder: the artifact folder.
        manifest: its verified manifest.
        forward: the device's runtime on a ``1 x 3 x H x W`` batch, returning logits.
        precision: the precision that runs (default: the manifest's), which picks the tolerance.
        runtime: the runtime's name, for the result.

    Returns:
        The result: ``status`` (``passed`` or ``absent``), the largest differences and the tolerance.

    Raises:
        GoldenMismatchError: the artifact's preprocessing does not reproduce the stored inputs, or the outputs
            differ beyond the tolerance or change top-1; one line naming the input, logit, values and tolerance.
    """
    folder = Path(folder)
    if GOLDEN_FILE not in manifest.get("files", {}):
        return {"status": "absent", "note": "no golden outputs (artifact made before golden outputs were added "
                                            "to exports): the runtime's numerics are not checked"}
    arrays = _load(folder)
    pre_diff = _check_preprocessing(folder, arrays)
    inputs, expected = arrays["inputs"].astype(np.float32), arrays["outputs"].astype(np.float64)
    precision = precision or str(manifest.get("precision", "fp32"))
    got = np.concatenate([np.asarray(forward(inputs[i:i + 1]), dtype=np.float32) for i in range(len(inputs))])
    if got.shape != expected.shape:
        raise GoldenMismatchError(f"the model gives {got.shape[-1]} logits per golden input, export stored "
                                  f"{expected.shape[-1]}; re-export the artifact")
    r = _compare(expected, got, precision)
    i, j = r["at"]
    if r["max_abs_diff"] > r["tolerance"] or r["flipped"] is not None:
        if r["max_abs_diff"] <= r["tolerance"]:
            n = r["flipped"]
            what = f"golden input {n} changes top-1 from class {int(expected[n].argmax())} to {int(got[n].argmax())}"
        else:
            what = f"golden input {i}, logit {j}: expected {r['expected']:.6g}, got {r['got']:.6g}"
        raise GoldenMismatchError(
            f"{what} (|diff| {r['max_abs_diff']:.3g}, {precision} tolerance {r['tolerance']:.3g}) on {runtime}: "
            "this runtime does not compute the model export measured (or model.onnx changed); re-export the artifact")
    return {"status": "passed", "inputs": len(inputs), "runtime": runtime, "precision": precision,
            "max_abs_diff": r["max_abs_diff"], "tolerance": r["tolerance"], "at": r["at"],
            "preprocess_max_diff": pre_diff, "top1_agree": True}


def summary(result: dict[str, Any]) -> str:
    """One line for a report: how the golden check went."""
    if result.get("status") != "passed":
        return str(result.get("note", "not checked"))
    return (f"{result['inputs']} inputs reproduced on {result['runtime']}: max |diff| {result['max_abs_diff']:.3g} "
            f"<= {result['tolerance']:.3g} ({result['precision']}), same top-1, preprocessing identical")


def runtime_precision(manifest: dict[str, Any], runtime: str, engine: str | None = None) -> str:
    """The precision whose tolerance applies: the manifest's, or a TensorRT engine's when it is looser (an FP32
    artifact may ship an FP16 engine). ``engine``: the precision of the engine that runs (one built on a board),
    else the artifact's ``model.engine``'s, from the manifest."""
    precision = str(manifest.get("precision", "fp32"))
    if runtime != "tensorrt":
        engine = None
    elif engine is None:
        engine = (manifest.get("tensorrt") or {}).get("precision")
    if engine in TOLERANCES and TOLERANCES[engine] > TOLERANCES.get(precision, 0.0):
        return str(engine)
    return precision
