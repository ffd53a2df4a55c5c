"""TensorRT without torch: an engine built from an ONNX file, its tensors by name, and a runner whose buffers, copies
and stream are cuda-python's (TensorRT 8.6 and 10).

This is the part of :mod:`edgetl.runtime.tensorrt` that the board runner ships to a Jetson (see
:mod:`edgetl.board.host`): numpy and the standard library at import time; ``tensorrt`` and ``cuda-python`` are
imported when a runner is activated. An engine only runs on the GPU and TensorRT version that built it, so the
board builds its own from the ONNX file it was sent.

Precision (the builder flags of a weakly typed network, before TensorRT 11):

- ``fp32``: FP32, with TF32 off (Ampere and later GPUs would otherwise round convolutions and matrix products to
  a 10-bit mantissa, which the FP32 tolerance of the golden check does not allow);
- ``fp16``: the FP16 flag (TensorRT keeps FP32 where FP16 would lose accuracy);
- ``int8``: explicit quantization from a QDQ model (the scales are the Q/DQ nodes'), FP16 elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import BackendUnavailableError, ConfigError, EdgetlError, ExportError
from edgetl.runtime.base import Runner, TensorSpec

log = logging.getLogger(__name__)

_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32,
                "INT64": np.int64, "BOOL": np.bool_}


@lru_cache(maxsize=1)
def trt_logger(trt: Any) -> Any:
    """TensorRT's logger, warnings and errors only (one per process)."""
    return trt.Logger(trt.Logger.WARNING)


def trt_major(trt: Any) -> int:
    """TensorRT's major version (8, 10, 11)."""
    return int(str(trt.__version__).split(".")[0])


def build_serialized(trt: Any, onnx_path: Path, precision: str, max_batch: int, opt_batch: int,
                     workspace_mb: int, graph: bytes | None = None) -> bytes:
    """Build an engine from an ONNX file (or from ``graph``, its bytes converted) and return it serialized.

    The network uses explicit batch; a dynamic batch dimension gets one optimization profile
    ``1 <= batch <= max_batch``, tuned for ``opt_batch``.

    Raises:
        ExportError: TensorRT cannot parse or build the model.
    """
    builder = trt.Builder(trt_logger(trt))
    # The parser owns the network's weights: it stays alive (in ``parser``) until the engine is built.
    network, parser = _parse_network(trt, builder, onnx_path, graph)
    config = _builder_config(trt, builder, precision, workspace_mb)
    _add_batch_profile(builder, network, config, onnx_path, opt_batch, max_batch)
    log.info("building a %s TensorRT engine from %s (this can take minutes)", precision, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}; see the TensorRT log above")
    data = bytes(serialized)
    del parser
    return data


def _parse_network(trt: Any, builder: Any, onnx_path: Path, graph: bytes | None) -> tuple[Any, Any]:
    """Parse the ONNX file (or ``graph``) into a new network; return (network, parser)."""
    # TensorRT < 10 needs the explicit-batch flag; 10 has only explicit batch; 11 has only strong typing.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if trt_major(trt) < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger(trt))
    parsed = parser.parse(graph, str(onnx_path)) if graph is not None else parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown parser error'}")
    return network, parser


def _builder_config(trt: Any, builder: Any, precision: str, workspace_mb: int) -> Any:
    """The builder configuration: workspace limit and, before TensorRT 11, the precision flags."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if trt_major(trt) >= 11:  # strongly typed builds: the graph's own types decide
        return config
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
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


@dataclass
class EngineTensors:
    """An engine's inputs and outputs by name: their shapes (-1 where dynamic) and, for a dynamic input, the
    largest shape of its optimization profile."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def load_engine(trt: Any, data: bytes, where: Any) -> tuple[Any, Any, Any, EngineTensors]:
    """Deserialize an engine and make its execution context: (runtime, engine, context, tensors).

    Raises:
        ExportError: the engine was built by another GPU model or TensorRT version, or there is no GPU memory left.
    """
    runtime = trt.Runtime(trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ExportError(f"TensorRT cannot load the engine from {where}: engines only run on the GPU model and "
                          "TensorRT version that built them; rebuild it on this device")
    context = engine.create_execution_context()
    if context is None:
        raise ExportError("TensorRT could not create an execution context (out of GPU memory?)")
    tensors = EngineTensors()
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensors.shapes[name] = tuple(engine.get_tensor_shape(name))
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            tensors.outputs.append(name)
            continue
        tensors.inputs.append(name)
        if any(d < 0 for d in tensors.shapes[name]):
            tensors.max_shapes[name] = tuple(engine.get_tensor_profile_shape(name, 0)[2])
    return runtime, engine, context, tensors


def input_spec(name: str, shape: tuple[int, ...], dtype: Any) -> TensorSpec:
    """An engine input as a :class:`TensorSpec`: a dynamic first dimension is ``batch``."""
    dims = tuple(d if d >= 0 else ("batch" if axis == 0 else None) for axis, d in enumerate(shape))
    return TensorSpec(name, dims, np.dtype(dtype))


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """The NumPy type of a TensorRT tensor type.

    Raises:
        ExportError: a type with no NumPy equivalent (BF16, FP8, INT4).
    """
    for name, np_type in _NUMPY_TYPES.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return np.dtype(np_type)
    raise ExportError(f"TensorRT tensor type {dtype} is not supported by the runner")


def set_input_shape(context: Any, name: str, shape: tuple[int, ...], limit: tuple[int, ...] | None) -> None:
    """Give the execution context the shape of input ``name`` (within its profile's maximum ``limit``).

    Raises:
        ConfigError: a shape beyond the profile, or one TensorRT refuses.
    """
    if limit is not None and any(a > b for a, b in zip(shape, limit)):  # noqa: B905 (board: Python 3.8)
        raise ConfigError(f"input '{name}' shape {list(shape)} exceeds the engine's profile maximum {list(limit)}; "
                          "rebuild the engine with a larger max_batch")
    if tuple(context.get_tensor_shape(name)) != tuple(shape) and not context.set_input_shape(name, tuple(shape)):
        raise ConfigError(f"TensorRT rejected input shape {list(shape)} for '{name}'")


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6).

    Raises:
        BackendUnavailableError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart  # deferred: optional
    except ImportError:
        try:
            from cuda import cudart  # deferred: optional (cuda-python < 12.6)
        except ImportError as exc:
            raise BackendUnavailableError(f"cuda-python is not installed ({exc}): `pip install cuda-python`, its "
                                          "major version the CUDA's (`nvcc --version`)") from exc
    return cudart


class TensorRTCudaRunner(Runner):
    """Runs an engine that it builds from an ONNX file on activation, with cuda-python device buffers, copies and
    stream (no torch). The serialized engine is kept, so activating the runner again does not rebuild it.

    Args:
        model_path: the ``.onnx`` file.
        precision: ``fp16``, ``int8`` (a QDQ model: explicit quantization) or ``fp32``.
        max_batch: the largest batch of the engine's optimization profile (a dynamic-batch model).
        opt_batch: the batch the builder tunes for.
        workspace_mb: the builder's workspace limit.
        name: a label for reports (default ``tensorrt``).
    """

    backend = "tensorrt"

    def __init__(self, model_path: str | Path, precision: str = "fp16", max_batch: int = 8, opt_batch: int = 1,
                 workspace_mb: int = 1024, name: str | None = None) -> None:
        super().__init__(name)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ConfigError(f"model {self.model_path} does not exist")
        self.precision = precision
        self.max_batch = max_batch
        self.opt_batch = opt_batch
        self.workspace_mb = workspace_mb
        self.plan: bytes | None = None
        self._trt: Any = None
        self._cudart: Any = None
        self._live: tuple[Any, Any, Any] | None = None  # the TensorRT runtime, engine and context
        self._stream: Any = None
        self._tensors = EngineTensors()
        self._specs: list[TensorSpec] = []
        self._out_types: dict[str, np.dtype] = {}
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)

    def activate_impl(self) -> None:
        import tensorrt as trt  # deferred: optional

        self._trt, self._cudart = trt, import_cudart()
        if trt_major(trt) >= 11 and self.precision == "fp16":
            raise ConfigError(f"TensorRT {trt.__version__} has no FP16 builder flag (it builds the graph's own "
                              "types): this runner builds FP16 engines with TensorRT 8.6 to 10")
        if self.plan is None:
            self.plan = build_serialized(trt, self.model_path, self.precision, self.max_batch, self.opt_batch,
                                         self.workspace_mb)
        runtime, engine, context, self._tensors = load_engine(trt, self.plan, self.model_path)
        self._live = (runtime, engine, context)
        self._stream = self._cuda(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._specs = [input_spec(n, self._tensors.shapes[n], numpy_dtype(trt, engine.get_tensor_dtype(n)))
                       for n in self._tensors.inputs]
        self._out_types = {n: numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in self._tensors.outputs}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, context = self._cudart, self._live[2]  # type: ignore[index]
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self._tensors.inputs:
            array = feed[name]
            set_input_shape(context, name, array.shape, self._tensors.max_shapes.get(name))
            pointer = self._buffer(name, array.nbytes)
            self._cuda(cudart.cudaMemcpyAsync(pointer, array, array.nbytes, to_device, self._stream), "a copy")
            context.set_tensor_address(name, pointer)
        outputs = {name: np.empty(tuple(context.get_tensor_shape(name)), self._out_types[name])
                   for name in self._tensors.outputs}
        for name, out in outputs.items():
            context.set_tensor_address(name, self._buffer(name, out.nbytes))
        if not context.execute_async_v3(self._stream):
            raise EdgetlError("TensorRT inference failed; see the TensorRT log above")
        for name, out in outputs.items():
            self._cuda(cudart.cudaMemcpyAsync(out, self._buffers[name][0], out.nbytes, to_host, self._stream),
                       "a copy")
        self._cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outputs

    def deactivate_impl(self) -> None:
        cudart, buffers, stream = self._cudart, self._buffers, self._stream
        self._buffers, self._stream, self._live = {}, None, None
        for pointer, _ in buffers.values():
            cudart.cudaFree(pointer)
        if stream is not None:
            cudart.cudaStreamDestroy(stream)

    def input_specs_impl(self) -> list[TensorSpec]:
        return self._specs

    def _buffer(self, name: str, nbytes: int) -> int:
        """The device buffer of tensor ``name``, at least ``nbytes`` long (grown when a larger batch comes)."""
        pointer, size = self._buffers.get(name, (0, -1))
        if size < nbytes:
            if size >= 0:
                self._cuda(self._cudart.cudaFree(pointer), "cudaFree")
            pointer = self._cuda(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def _cuda(self, result: tuple[Any, ...], what: str) -> Any:
        """The value of a cuda-python call (which returns its error first), or an error naming the call."""
        error, rest = result[0], result[1:]
        if error != self._cudart.cudaError_t.cudaSuccess:
            raise EdgetlError(f"CUDA failed in {what}: {error!r}")
        return rest[0] if rest else None
