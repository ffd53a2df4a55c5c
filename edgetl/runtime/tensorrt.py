"""TensorRT runner and engine builder (TensorRT 8.6 and 10 Python API, tensor-name based).

``tensorrt`` is imported lazily: without it (or without a CUDA GPU) every entry point raises
:class:`~edgetl.errors.BackendUnavailableError` saying how to get it. Device buffers are torch CUDA
tensors, so no extra CUDA binding package is needed.

Precision:

- ``fp32``: TensorRT's default.
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
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import atomic_write_bytes
from edgetl.errors import BackendUnavailableError, ConfigError, EdgetlError, ExportError
from edgetl.options import PRECISIONS
from edgetl.runtime.base import Runner, TensorSpec

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


@lru_cache(maxsize=1)
def _logger() -> Any:
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _has_qdq(onnx_path: Path) -> bool:
    import onnx  # deferred: heavy

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


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
    builder = trt.Builder(_logger())
    # The parser owns the network's weights: it stays alive (in ``parsed``) until the engine is built.
    network, *parsed = _parse_network(trt, builder, onnx_path, precision)
    config = _builder_config(trt, builder, precision, workspace_mb)
    _add_batch_profile(builder, network, config, onnx_path, opt_batch, max_batch)
    log.info("building a %s TensorRT engine from %s (this can take minutes)", precision, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}; see the TensorRT log above")
    data = bytes(serialized)
    del parsed
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
    if precision == "int8" and not _has_qdq(onnx_path):
        raise ExportError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes; TensorRT INT8 here uses explicit "
            "quantization, so export a QDQ model first (edgetl export --precision int8)"
        )


def _parse_network(trt: Any, builder: Any, onnx_path: Path, precision: str) -> tuple[Any, Any, bytes | None]:
    """Parse the ONNX file into a new network; return (network, parser, the graph bytes parsed, if not the file)."""
    major = _major(trt)
    # TensorRT < 10 needs the explicit-batch flag; 10 has only explicit batch; 11 has only strong typing.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _logger())
    graph = _fp16_graph(onnx_path) if precision == "fp16" and major >= 11 else None
    parsed = parser.parse(graph, str(onnx_path)) if graph is not None else parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown parser error'}")
    return network, parser, graph


def _builder_config(trt: Any, builder: Any, precision: str, workspace_mb: int) -> Any:
    """The builder configuration: workspace limit and, before TensorRT 11, the precision flags."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if _major(trt) < 11:  # weakly typed builds: precision comes from builder flags
        if precision in ("fp16", "int8"):
            if not getattr(builder, "platform_has_fast_fp16", True):
                log.warning("this GPU has no fast FP16; TensorRT may run most layers in FP32")
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    return config


def _add_batch_profile(builder: Any, network: Any, config: Any, onnx_path: Path, opt_batch: int,
                       max_batch: int) -> None:
    """Give a dynamic batch dimension the optimization profile ``1 <= batch <= max_batch`` (tuned for ``opt_batch``)."""
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        dynamic = [axis for axis, d in enumerate(shape) if d < 0]
        if not dynamic:
            continue
        if dynamic != [0]:
            raise ExportError(
                f"input '{tensor.name}' of {onnx_path} has dynamic dimensions {shape} beyond the batch; "
                "export it with a fixed resolution"
            )
        profile = profile or builder.create_optimization_profile()
        rest = shape[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
    if profile is not None:
        config.add_optimization_profile(profile)


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
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        self._max_shapes: dict[str, tuple[int, ...]] = {}
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
        runtime = trt.Runtime(_logger())
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ExportError(
                f"TensorRT cannot load the engine from {self.model_path}: engines only run on the GPU model and "
                "TensorRT version that built them; rebuild it on this device"
            )
        context = engine.create_execution_context()
        if context is None:
            raise ExportError("TensorRT could not create an execution context (out of GPU memory?)")
        self._runtime, self.engine, self.context = runtime, engine, context
        self._stream = torch.cuda.Stream(device=self._device)
        self._inputs, self._input_names, self._output_names = [], [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = tuple(engine.get_tensor_shape(name))
                dims: tuple[int | str | None, ...] = tuple(
                    d if d >= 0 else ("batch" if axis == 0 else None) for axis, d in enumerate(shape)
                )
                dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
                self._inputs.append(TensorSpec(name, dims, _np_dtype(dtype)))
                self._input_names.append(name)
                self._input_dtypes[name] = dtype
                if any(d < 0 for d in shape):
                    self._max_shapes[name] = tuple(engine.get_tensor_profile_shape(name, 0)[2])
            else:
                self._output_names.append(name)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch  # deferred: heavy

        trt, context = self._trt, self.context
        keep_alive = []
        with torch.cuda.stream(self._stream):
            for name in self._input_names:
                array = feed[name]
                limit = self._max_shapes.get(name)
                if limit is not None and any(a > b for a, b in zip(array.shape, limit, strict=True)):
                    raise ConfigError(
                        f"input '{name}' shape {list(array.shape)} exceeds the engine's profile maximum "
                        f"{list(limit)}; rebuild the engine with a larger max_batch"
                    )
                if tuple(context.get_tensor_shape(name)) != array.shape and not context.set_input_shape(
                    name, array.shape
                ):
                    raise ConfigError(f"TensorRT rejected input shape {list(array.shape)} for '{name}'")
                tensor = torch.from_numpy(array).to(
                    self._device, dtype=self._input_dtypes[name], non_blocking=True
                )
                keep_alive.append(tensor)
                context.set_tensor_address(name, tensor.data_ptr())
            outputs: dict[str, Any] = {}
            for name in self._output_names:
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
