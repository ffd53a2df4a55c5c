"""edgetl: transfer learning for edge devices.

Select a pretrained backbone for a device, fine-tune it on your images, export it to ONNX (FP16/INT8,
TensorRT), and validate accuracy and latency against the device's budget::

    import edgetl
    ranking = edgetl.select(device="jetson", max_latency_ms=10, precision="fp16")
    print(ranking.best.card.id)

The public API is loaded lazily, so ``import edgetl`` does not import torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types
import warnings
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

#: Modules that moved when the flat package became zoo/, device/ and calibrate/: the old names still import,
#: with a DeprecationWarning. (``edgetl.predict`` now classifies images; the latency predictor it was is
#: ``edgetl.device.latency``.)
_MOVED = {
    "edgetl.catalog": "edgetl.zoo.catalog",
    "edgetl.zoo_timm": "edgetl.zoo.timm",
    "edgetl.weights": "edgetl.zoo.weights",
    "edgetl.weights_import": "edgetl.zoo.weights_import",
    "edgetl.cost": "edgetl.zoo.cost",
    "edgetl.onnx_io": "edgetl.zoo.onnx_io",
    "edgetl.onnx_exporters": "edgetl.zoo.onnx_exporters",
    "edgetl.onnx_cache": "edgetl.zoo.onnx_cache",
    "edgetl.export.quantize": "edgetl.zoo.quantize",
    "edgetl.profiles": "edgetl.device.profiles",
    "edgetl.machine": "edgetl.device.machine",
    "edgetl.budget": "edgetl.device.budget",
    "edgetl.kernels": "edgetl.device.kernel_model",
    "edgetl.measure": "edgetl.calibrate.measure",
    "edgetl.infer": "edgetl.predict",
    "edgetl.demo_data": "edgetl.data.synthetic",
    "edgetl.cli_options": "edgetl.cli.params",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module it moved to, with a DeprecationWarning."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    def create_module(self, spec: Any) -> types.ModuleType:
        warnings.warn(f"{spec.name} moved to {_MOVED[spec.name]}; import it from there", DeprecationWarning,
                      stacklevel=2)
        module = import_module(_MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """The module is already executed; give it back the spec the import machinery replaced."""
        module.__spec__ = self._specs[module.__name__]


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


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
