"""Catalog architectures as ONNX files: exported with seeded random weights, once, into edgetl's cache.

Latency does not depend on the values of the weights, so benchmarks and device calibration time
these files instead of trained models.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import metadata
from typing import Any

from edgetl._io import atomic_write_json, cache_dir
from edgetl.errors import ConfigError
from edgetl.zoo.catalog import deployed_model, get_card
from edgetl.zoo.onnx_io import DEFAULT_OPSET, OnnxExportReport, export_onnx
from edgetl.zoo.weights import load_model

log = logging.getLogger(__name__)

_CACHE_SCHEMA = 1


def export_catalog_model(
    name: str,
    path: str | os.PathLike[str],
    resolution: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> OnnxExportReport:
    """Export a catalog model with its 1000-class head, e.g. to benchmark its architecture.

    Args:
        name: a catalog name or id (``resnet18``).
        path: the ``.onnx`` file to write.
        resolution: the input size (default: the size the catalog's accuracy was measured at).
        weights: None for random init (timing does not need real weights), ``imagenet`` or a PATH
            to a state_dict (see :func:`edgetl.zoo.weights.load_model`).
        seed: the seed of the random init (the torch RNG state outside is left untouched).
        **kwargs: passed to :func:`edgetl.zoo.onnx_io.export_onnx` (``batch``, ``opset``, ``simplify``...).
    """
    card = get_card(name)
    resolution = card.resolution if resolution is None else resolution
    min_h, min_w = card.min_size
    if resolution < max(min_h, min_w):
        raise ConfigError(f"{card.name} needs an input of at least {min_h}x{min_w}; got {resolution}")
    import torch  # deferred: heavy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random init is then the same every time: reproducible files
        loaded = load_model(card, weights=weights, resolution=resolution)
    return export_onnx(deployed_model(loaded.model, card), path, resolution=resolution, **kwargs)


def cached_catalog_onnx(name: str, resolution: int | None = None, opset: int = DEFAULT_OPSET) -> OnnxExportReport:
    """Export a randomly initialised catalog model once and reuse the file from edgetl's cache.

    Timing does not need trained weights, so benchmarks and device calibration share these files.
    The cache key holds the model id, resolution, opset and the torch, onnx and onnxslim versions.

    Returns:
        The report of the export that wrote the cached file (its ``path`` is in the cache folder).
    """
    card = get_card(name)
    resolution = card.resolution if resolution is None else resolution
    versions = "-".join(f"{pkg}{metadata.version(pkg)}" for pkg in ("torch", "onnx", "onnxslim"))
    stem = f"{card.id}-{resolution}px-opset{opset}-{versions}-v{_CACHE_SCHEMA}".replace("+", "_")
    folder = cache_dir("onnx")
    onnx_path, report_path = folder / f"{stem}.onnx", folder / f"{stem}.json"
    if onnx_path.is_file() and report_path.is_file():
        try:
            report = OnnxExportReport.from_dict(json.loads(report_path.read_text()))
            if report.path == onnx_path and report.file_bytes == onnx_path.stat().st_size:
                log.info("using the cached export %s", onnx_path)
                return report
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable export record %s: %s", report_path, exc)
    report = export_catalog_model(card.id, onnx_path, resolution=resolution, opset=opset)
    atomic_write_json(report_path, report.to_dict())
    return report
