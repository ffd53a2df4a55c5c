"""edgetl: transfer learning for edge devices.

Select a pretrained backbone for a device, fine-tune it on your images, export it to ONNX (FP16/INT8,
TensorRT), and validate accuracy and latency against the device's budget::

    import edgetl
    ranking = edgetl.select(device="jetson", max_latency_ms=10, precision="fp16")
    print(ranking.best.card.id)

The public API is loaded lazily, so ``import edgetl`` does not import torch.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "select": "edgetl.select",
    "Ranking": "edgetl.select",
    "finetune": "edgetl.finetune.api",
    "RunResult": "edgetl.finetune.api",
    "load_trained_model": "edgetl.finetune.api",
    "export": "edgetl.export.api",
    "Artifact": "edgetl.export.api",
    "validate": "edgetl.validate",
    "ValidationReport": "edgetl.validate",
    "build": "edgetl.pipeline",
    "BuildResult": "edgetl.pipeline",
    "make_demo_dataset": "edgetl.data.synthetic",
    "list_models": "edgetl.zoo.catalog",
    "get_card": "edgetl.zoo.catalog",
    "ModelCard": "edgetl.zoo.catalog",
    "load_profile": "edgetl.device.profiles",
    "list_profiles": "edgetl.device.profiles",
    "DeviceProfile": "edgetl.device.schema",
    "SelectOptions": "edgetl.options",
    "Constraints": "edgetl.options",
    "FinetuneOptions": "edgetl.options",
    "ExportOptions": "edgetl.options",
    "ValidateOptions": "edgetl.options",
    "predict": "edgetl.predict",
    "Prediction": "edgetl.predict",
    "import_weights": "edgetl.zoo.weights_import",
    "EdgetlError": "edgetl.errors",
    "BudgetExceededError": "edgetl.errors",
}

__all__ = sorted(_API)


class _Package(types.ModuleType):
    """The ``edgetl`` package. Importing the submodule ``edgetl.select`` (or finetune, export, validate)
    would bind that module over the API function of the same name; this keeps the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgetl' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
