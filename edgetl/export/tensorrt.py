"""The artifact's TensorRT engine: checks up front, the build, and what to record about it.

A TensorRT engine only runs on the GPU model and TensorRT version that built it, so it is built on
the device itself. Without TensorRT here, :func:`require_tensorrt` fails fast (before the export
does any work) and says how to build on the device: ``edgetl export ... --tensorrt`` there, or the
matching ``trtexec`` line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from edgetl.errors import BackendUnavailableError
from edgetl.runtime.tensorrt import build_engine, import_tensorrt, tensorrt_available

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"


def engine_precision(artifact_precision: str, int8_mode: str | None, profile_precisions: list[str]) -> str:
    """The engine's precision for an artifact: the artifact's own, INT8 only from a QDQ model.

    An FP32 artifact gets an FP32 engine and an FP16 one an FP16 engine, so the engine computes what
    the artifact's accuracy was measured on. A dynamically quantized model has no Q/DQ pairs TensorRT
    could use, so its engine is built from the FP32 graph, in FP16 where the device has it.
    """
    if artifact_precision == "int8":
        if int8_mode == "static":
            return "int8"
        return "fp16" if "fp16" in profile_precisions else "fp32"
    return artifact_precision


def trtexec_command(onnx_name: str, precision: str, resolution: int, max_batch: int = 8,
                    engine_name: str = ENGINE_FILE) -> str:
    """The ``trtexec`` line that builds the same engine as :func:`build_tensorrt_engine`."""
    flags = {"fp16": " --fp16", "int8": " --int8 --fp16", "fp32": ""}[precision]
    shape = f"3x{resolution}x{resolution}"
    return (
        f"trtexec --onnx={onnx_name} --saveEngine={engine_name}{flags} "
        f"--minShapes=input:1x{shape} --optShapes=input:1x{shape} --maxShapes=input:{max_batch}x{shape}"
    )


def require_tensorrt(precision: str, resolution: int, out: str | os.PathLike[str]) -> None:
    """Fail fast when this machine cannot build a TensorRT engine.

    Raises:
        BackendUnavailableError: no tensorrt package or no CUDA GPU; the message gives both ways to
            build on the device.
    """
    if tensorrt_available():
        return
    raise BackendUnavailableError(
        "--tensorrt needs the tensorrt package and an NVIDIA GPU, and this machine has "
        f"{_what_is_missing()}; an engine only runs on the GPU and TensorRT version that built it, so build it "
        f"on the device: run `edgetl export ... --tensorrt` there, or export without --tensorrt, copy "
        f"{Path(out).name}/ to the device and run `{trtexec_command('model.onnx', precision, resolution)}`"
    )


def _what_is_missing() -> str:
    try:
        import_tensorrt()
    except BackendUnavailableError:
        return "no usable tensorrt"
    return "no CUDA GPU"


def build_tensorrt_engine(onnx_path: str | os.PathLike[str], out: str | os.PathLike[str], precision: str,
                          max_batch: int = 8) -> dict[str, Any]:
    """Build the engine with TensorRT's Python API and describe it for the manifest.

    Args:
        onnx_path: the FP32 ONNX model (FP16 engines), or the QDQ model (INT8 engines).
        out: the ``model.engine`` file to write (atomically).
        precision: ``fp16``, ``int8`` or ``fp32``.
        max_batch: the largest batch of the engine's optimization profile.

    Returns:
        ``{"file", "precision", "tensorrt_version", "gpu", "compute_capability", "max_batch", "built_from"}``.
    """
    import torch  # deferred: heavy

    trt = import_tensorrt()
    build_engine(onnx_path, precision=precision, max_batch=max_batch, opt_batch=1, out=out)
    major, minor = torch.cuda.get_device_capability()
    return {
        "file": Path(out).name,
        "precision": precision,
        "tensorrt_version": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "max_batch": max_batch,
        "built_from": "QDQ model (explicit quantization)" if precision == "int8" else "FP32 ONNX model",
    }
