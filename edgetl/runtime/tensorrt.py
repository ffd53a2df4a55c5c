"""TensorRT runner and engine builder (TensorRT 8.6 and 10 Python API, tensor-name based).

``tensorrt`` is imported lazily: without it (or without a CUDA GPU) every entry point raises
:class:`~edgetl.errors.BackendUnavailableError` saying how to get it. Device buffers are torch CUDA
tensors, so no extra CUDA binding package is needed. The build and the engine's tensors are
:mod:`edgetl.runtime.tensorrt_core`'s, which the board runner uses without torch.

Precision:

- ``fp32``: FP32, TF32 off (see :mod:`edgetl.runtime.tensorrt_core`).
- ``fp16``: on TensorRT 8.6/10 the FP16 builder flag (TensorRT keeps FP32 where FP16 would lose
  accuracy). TensorRT 11 removed the precision flags and only builds strongly typed networks, so
  there an FP32 graph is first converted to FP16 (ONNX Runtime's converter, float32 input and
  output kept) and the network takes the precision of the graph.
- ``int8``: explicit quantization from a QDQ model (``edgetl export --precision int8`` writes one).
  The scales come from the Q/DQ nodes, so no calibrator runs; layers outside Q/DQ pairs run in FP16
  (FP32 on TensorRT 11, where the graph's own types decide).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import atomic_write_bytes
from edgetl.errors import BackendUnavailableError, ConfigError, EdgetlError, ExportError
from edgetl.options import PRECISIONS
from edgetl.runtime.base import Runner, TensorSpec
from edgetl.runtime.tensorrt_core import (
    EngineTensors,
    build_serialized,
    input_spec,
    load_engine,
    set_input_shape,
    trt_major,
)

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

_INSTALL_HINT = (
    'install it with `pip install "edgetl[tensorrt]"` on a machine with an NVIDIA GPU and CUDA, '
    "or on a Jetson use the TensorRT that JetPack ships (build the engine on the device itself)"
)


def import_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module.

    Raises:
        BackendUnavailableError: tensorrt is not installed or cannot load its libraries.
    """
    try:
        import tensorrt as trt  # deferred: optional
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not installed ({exc}); {_INSTALL_HINT}") from exc
    except OSError as exc:  # the wheel is there but libnvinfer / CUDA libraries are not
        raise BackendUnavailableError(f"TensorRT cannot load its libraries ({exc}); {_INSTALL_HINT}") from exc
    return trt


def tensorrt_available() -> bool:
    """Whether TensorRT can be imported and a CUDA GPU is visible to torch."""
    try:
        import_tensorrt()
    except BackendUnavailableError:
        return False
    import torch  # deferred: heavy

    return torch.cuda.is_available()


def _require_cuda() -> None:
    import torch  # deferred: heavy

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "TensorRT needs an NVIDIA GPU with CUDA, and torch sees none here; run on the target device "
            "(e.g. the Jetson) or use --runtime onnxruntime"
        )


def require_qdq(onnx_path: str | os.PathLike[str]) -> None:
    """Refuse an INT8 build of a model without Q/DQ nodes (TensorRT INT8 here is explicit quantization).

    Raises:
        ExportError: the model has no QuantizeLinear/DequantizeLinear node.
    """
    import onnx  # deferred: heavy

    model = onnx.load(str(onnx_path), load_external_data=False)
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ExportError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes; TensorRT INT8 here uses explicit "
            "quantization, so export a QDQ model first (edgetl export --precision int8 --int8-mode static)"
        )


def _fp16_graph(onnx_path: Path) -> bytes | None:
    """The model converted to FP16 with float32 I/O, or None if it already holds FP16 weights."""
    import onnx  # deferred: heavy
    from onnxruntime.transformers.float16 import convert_float_to_float16  # deferred: heavy

    model = onnx.load(str(onnx_path))
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return None
    return convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def build_engine(
    onnx_path: str | os.PathLike[str],
    precision: str = "fp16",
    max_batch: int = 8,
    opt_batch: int = 1,
    workspace_mb: int = 1024,
    out: str | os.PathLike[str] | None = None,
) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file.

    The network uses explicit batch; a dynamic batch dimension gets one optimization profile
    ``1 <= batch <= max_batch``, tuned for ``opt_batch``.

    Args:
        onnx_path: the ONNX model (input NCHW float32; the batch may be dynamic).
        precision: ``fp32``, ``fp16`` or ``int8`` (needs a QDQ model: explicit quantization).
        max_batch: the largest batch the engine accepts when the batch is dynamic.
        opt_batch: the batch TensorRT tunes kernels for.
        workspace_mb: the builder's workspace memory pool limit.
        out: also write the engine to this path (atomically).

    Returns:
        The serialized engine (the bytes of a ``.engine`` file).

    Raises:
        BackendUnavailableError: no TensorRT or no GPU here.
        ExportError: the ONNX model cannot be parsed or built, or INT8 was asked of a model without Q/DQ.
        ConfigError: a bad precision or batch range.
    """
    _check_build_request(precision, opt_batch, max_batch)
    trt = import_tensorrt()
    _require_cuda()
    onnx_path = Path(onnx_path)
    _check_onnx_file(onnx_path, precision)
    graph = _fp16_graph(onnx_path) if precision == "fp16" and trt_major(trt) >= 11 else None
    data = build_serialized(trt, onnx_path, precision, max_batch, opt_batch, workspace_mb, graph)
    if out is not None:
        atomic_write_bytes(out, data)
        log.info("wrote TensorRT engine %s (%.1f MB)", out, len(data) / 1e6)
    return data


def _check_build_request(precision: str, opt_batch: int, max_batch: int) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")


def _check_onnx_file(onnx_path: Path, precision: str) -> None:
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist")
    if precision == "int8":
        require_qdq(onnx_path)


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch  # deferred: heavy

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise ExportError(f"TensorRT tensor type {dtype} is not supported by the runner")


def _np_dtype(torch_dtype: Any) -> np.dtype:
    try:
        return np.dtype(str(torch_dtype).removeprefix("torch."))
    except TypeError:  # bfloat16 has no NumPy type; such inputs are fed as float32 and converted
        return np.dtype(np.float32)


class TensorRTRunner(Runner):
    """Runs a TensorRT engine, built from an ONNX file on activation or loaded from an engine file.

    Args:
        model_path: an ``.onnx`` file (an engine is built from it) or a serialized engine
            (``.engine``/``.plan``/``.trt``, built on this device with the same TensorRT version).
        precision: ``fp16`` (default), ``int8`` (QDQ model, explicit quantization) or ``fp32``;
            used only when building from ONNX.
        max_batch: the largest batch of the engine's optimization profile (dynamic-batch models).
        opt_batch: the batch the builder tunes for.
        workspace_mb: the builder's workspace limit.
        engine_path: where to save the engine built from ONNX (atomically), to reuse it later.
        name: a label for reports (default ``tensorrt``).

    Raises:
        BackendUnavailableError: tensorrt is not installed or there is no CUDA GPU.
    """

    backend = "tensorrt"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        precision: str = "fp16",
        max_batch: int = 8,
        opt_batch: int = 1,
        workspace_mb: int = 1024,
        engine_path: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown TensorRT precision '{precision}'; use one of {', '.join(PRECISIONS)}")
        self.model_path = Path(model_path)
        self.precision = precision
        self.max_batch = max_batch
        self.opt_batch = opt_batch
        self.workspace_mb = workspace_mb
        self.engine_path = Path(engine_path) if engine_path is not None else None
        self._trt = import_tensorrt()
        _require_cuda()
        if not self.model_path.is_file():
            raise ConfigError(f"model {self.model_path} does not exist")
        self.engine: Any = None
        self.context: Any = None
        self._stream: Any = None
        self._device: Any = None
        self._inputs: list[TensorSpec] = []
        self._tensors = EngineTensors()
        self._input_dtypes: dict[str, Any] = {}

    def activate_impl(self) -> None:
        import torch  # deferred: heavy

        trt = self._trt
        if self.model_path.suffix.lower() in ENGINE_SUFFIXES:
            data = self.model_path.read_bytes()
        else:
            data = build_engine(
                self.model_path, self.precision, self.max_batch, self.opt_batch, self.workspace_mb,
                out=self.engine_path,
            )
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._runtime, self.engine, self.context, self._tensors = load_engine(trt, data, self.model_path)
        self._stream = torch.cuda.Stream(device=self._device)
        self._input_dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self._tensors.inputs}
        self._inputs = [input_spec(n, self._tensors.shapes[n], _np_dtype(self._input_dtypes[n]))
                        for n in self._tensors.inputs]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch  # deferred: heavy

        trt, context = self._trt, self.context
        keep_alive = []
        with torch.cuda.stream(self._stream):
            for name in self._tensors.inputs:
                array = feed[name]
                set_input_shape(context, name, array.shape, self._tensors.max_shapes.get(name))
                tensor = torch.from_numpy(array).to(
                    self._device, dtype=self._input_dtypes[name], non_blocking=True
                )
                keep_alive.append(tensor)
                context.set_tensor_address(name, tensor.data_ptr())
            outputs: dict[str, Any] = {}
            for name in self._tensors.outputs:
                shape = tuple(context.get_tensor_shape(name))
                dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device=self._device)
                context.set_tensor_address(name, outputs[name].data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise EdgetlError("TensorRT inference failed; see the TensorRT log above")
            host = {name: t.to("cpu", non_blocking=False) for name, t in outputs.items()}
        self._stream.synchronize()
        return {name: t.numpy() for name, t in host.items()}

    def deactivate_impl(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None
        self._stream = None

    def input_specs_impl(self) -> list[TensorSpec]:
        return self._inputs
