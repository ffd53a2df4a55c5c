"""Image datasets for fine-tuning: discovery, splits, robust decoding, transforms, loaders.

* :func:`scan_dataset` (:mod:`~edgetl.data.discover`) reads a folder with ``train/`` and ``val/``
  [and ``test/``] folders of class folders, a single folder of class folders split by ``val_split``
  and ``test_split`` (:mod:`~edgetl.data.splits`), or a CSV file of ``path,label[,split]`` rows
  (:mod:`~edgetl.data.csvfile`).
* :func:`load_rgb` (:mod:`~edgetl.data.decode`) returns every image as 8-bit RGB, EXIF orientation
  applied, transparent pixels on **white**. A file that cannot be decoded is skipped with a warning that
  names it and is recorded in :attr:`DatasetSplits.skipped` (``on_bad_image="skip"``), or raises
  :class:`~edgetl.errors.DataError` (``on_bad_image="error"``).
* :func:`build_transform` (:mod:`~edgetl.data.transforms`) and :func:`make_loader`
  (:mod:`~edgetl.data.loader`) turn the records into batches of tensors.

The transforms and loaders need torch and torchvision, so their names are loaded on first use: importing
this package to scan a dataset or decode images does not import torch. :func:`make_demo_dataset` lives in
:mod:`edgetl.data.synthetic` and is re-exported here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from edgetl.data.decode import ALPHA_BACKGROUND, FULL_CHECK_MAX_BYTES, check_image, load_rgb, to_rgb
from edgetl.data.discover import IMG_EXTENSIONS, scan_dataset
from edgetl.data.options import AUGMENTATIONS, CHECKS, ON_BAD_IMAGE
from edgetl.data.splits import IMBALANCE_WARN_RATIO, SPLITS, DatasetSplits, Record

_LAZY = {
    "build_transform": "edgetl.data.transforms",
    "build_tensor_pipeline": "edgetl.data.transforms",
    "PrepareImage": "edgetl.data.transforms",
    "DecodedStore": "edgetl.data.store",
    "estimate_bytes": "edgetl.data.store",
    "memory_budget": "edgetl.data.store",
    "BadSample": "edgetl.data.loader",
    "ImageDataset": "edgetl.data.loader",
    "ImageLoader": "edgetl.data.loader",
    "balanced_sampler": "edgetl.data.loader",
    "collate_skip_bad": "edgetl.data.loader",
    "make_loader": "edgetl.data.loader",
    "DEMO_KINDS": "edgetl.data.synthetic",
    "DEMO_SHAPES": "edgetl.data.synthetic",
    "DEMO_TEXTURES": "edgetl.data.synthetic",
    "make_demo_dataset": "edgetl.data.synthetic",
}

__all__ = [
    "ALPHA_BACKGROUND",
    "AUGMENTATIONS",
    "CHECKS",
    "FULL_CHECK_MAX_BYTES",
    "IMBALANCE_WARN_RATIO",
    "IMG_EXTENSIONS",
    "ON_BAD_IMAGE",
    "SPLITS",
    "DatasetSplits",
    "Record",
    "check_image",
    "load_rgb",
    "scan_dataset",
    "to_rgb",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
