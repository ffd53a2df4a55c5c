"""Inference runners (ONNX Runtime, eager torch, TensorRT) with one interface, and benchmarking.

The runner modules import their backends when a runner is built or activated: importing this package
loads neither torch, onnxruntime nor tensorrt.
"""

from __future__ import annotations

import os
from typing import Any

from edgetl.errors import ConfigError
from edgetl.runtime.base import INPUT_NAME, OUTPUT_NAME, Runner, TensorSpec
from edgetl.runtime.bench import BenchResult, benchmark, benchmark_interleaved
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import TensorRTRunner
from edgetl.runtime.torch import TorchRunner

RUNTIMES = ("onnxruntime", "torch", "tensorrt")

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "RUNTIMES",
    "BenchResult",
    "OnnxRuntimeRunner",
    "Runner",
    "TensorRTRunner",
    "TensorSpec",
    "TorchRunner",
    "benchmark",
    "benchmark_interleaved",
    "make_runner",
]


def make_runner(kind: str, model_or_path: Any, **kwargs: Any) -> Runner:
    """Build a runner of the given kind.

    Args:
        kind: ``onnxruntime``, ``torch`` or ``tensorrt``.
        model_or_path: an ONNX path or bytes (onnxruntime), an ONNX or engine path (tensorrt), or a
            ``torch.nn.Module`` (torch).
        **kwargs: passed to the runner (``threads``, ``providers``, ``device``, ``precision``...).

    Raises:
        ConfigError: an unknown kind, or a model the runtime cannot run (an ONNX file for torch).
        BackendUnavailableError: the backend is not installed here.
    """
    if kind == "onnxruntime":
        if not isinstance(model_or_path, (str, os.PathLike, bytes, bytearray)):
            raise ConfigError(
                f"the onnxruntime runtime needs an ONNX file, got {type(model_or_path).__name__}; "
                "export the model first (edgetl.zoo.onnx_io.export_onnx)"
            )
        return OnnxRuntimeRunner(model_or_path, **kwargs)
    if kind == "torch":
        if isinstance(model_or_path, (str, os.PathLike, bytes, bytearray)):
            raise ConfigError(
                f"the torch runtime runs PyTorch modules, not files ({model_or_path!s:.80}); "
                "run an ONNX file with --runtime onnxruntime or tensorrt"
            )
        return TorchRunner(model_or_path, **kwargs)
    if kind == "tensorrt":
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise ConfigError(
                f"the tensorrt runtime needs an ONNX or engine file, got {type(model_or_path).__name__}"
            )
        return TensorRTRunner(model_or_path, **kwargs)
    raise ConfigError(f"unknown runtime '{kind}'; use one of {', '.join(RUNTIMES)}")
