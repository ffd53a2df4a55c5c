"""What models are and what they cost: the catalog of both zoos (torchvision, timm), weights (pull, import,
load), cost traces on the meta device, and the ONNX helpers that export and quantize a model.

``edgetl.zoo.build(name, weights, resolution, num_classes)`` builds a catalog model (:mod:`edgetl.zoo.builder`).
It is loaded on first use, so ``import edgetl.zoo`` does not import torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_API = {"build": "edgetl.zoo.builder"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgetl.zoo' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
