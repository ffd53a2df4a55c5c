"""Reduced-precision ONNX models: FP16 conversion and INT8 quantization (dynamic, and static QDQ).

- **FP16** (:func:`convert_fp16`): ``onnxruntime.transformers.float16`` converts weights and ops to
  float16 and keeps the graph's inputs and outputs float32 (``keep_io_types``), so the artifact's
  contract (input ``input`` NCHW float32, output ``logits`` float32) holds at every precision.
- **INT8 dynamic** (:func:`quantize_int8_dynamic`): weights of MatMul/Gemm in int8, activations
  quantized on the fly. Suits linear-heavy models (ViT, Swin, ConvNeXt's pointwise layers).
- **INT8 static** (:func:`quantize_int8_static`): ONNX Runtime's ``quantize_static`` in QDQ format
  with per-channel weight scales, calibrated on real images, after ``quant_pre_process`` (symbolic
  shape inference and graph optimization). QDQ is also what TensorRT takes for explicit INT8.

Which integer types: on an ONNX Runtime CPU target, uint8 activations and int8 weights (U8S8, the
fast path of MLAS); ``reduce_range`` (7-bit weights) where the CPU lacks VNNI, since the AVX2 U8S8
multiply can saturate. For TensorRT, symmetric int8 activations and weights (zero points of 0),
which is all TensorRT accepts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import atomic_path
from edgetl.errors import ConfigError, ExportError
from edgetl.options import CALIB_METHODS, INT8_MODES

log = logging.getLogger(__name__)

_DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
_WEIGHTED_LINEAR = ("MatMul", "Gemm")


@dataclass(frozen=True)
class QuantReport:
    """What a conversion did.

    Attributes:
        precision: ``fp16`` or ``int8``.
        mode: ``fp16``, ``static`` or ``dynamic``.
        path: the file written.
        file_bytes: its size.
        seconds: wall time of the conversion (pre-processing and calibration included).
        format: ``QDQ`` for static INT8, ``QOperator``-free dynamic ops for dynamic INT8, else None.
        per_channel: per-channel weight scales.
        reduce_range: 7-bit weights (CPUs without VNNI).
        activation_type, weight_type: ``uint8``/``int8``.
        calib_method: ``minmax``, ``entropy`` or ``percentile`` (static only).
        calib_images: images the calibration saw (static only).
        calib_fallback: why the calibration method asked for was replaced by minmax, if it was.
        exclude_op_types: op types left in float.
        kept_in_float: layers (node names) left in float by accuracy control.
        op_counts: node count by op type of the result.
    """

    precision: str
    mode: str
    path: Path
    file_bytes: int
    seconds: float
    format: str | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    calib_method: str | None = None
    calib_images: int | None = None
    calib_fallback: str | None = None
    exclude_op_types: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    kept_in_float: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:limit]


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep ONNX Runtime's quantizer quiet: it prints progress to stdout (which must stay clean for
    ``--json``) and logs warnings on the root logger. What it printed is logged at debug level."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        if buf.getvalue().strip():
            log.debug("onnxruntime.quantization output:\n%s", buf.getvalue().strip())


def is_linear_heavy(onnx_path: str | os.PathLike[str]) -> bool:
    """Whether a model's weighted layers are mostly MatMul/Gemm rather than Conv (ViT, Swin, ConvNeXt).

    Such models quantize well dynamically (int8 weights, activations quantized at run time); conv
    networks need static calibration to gain speed.
    """
    import onnx  # deferred: heavy

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    linear = sum(1 for n in model.graph.node if n.op_type in _WEIGHTED_LINEAR and any(i in weights for i in n.input))
    conv = sum(1 for n in model.graph.node if n.op_type == "Conv")
    return linear > conv


def resolve_int8_mode(mode: str, onnx_path: str | os.PathLike[str]) -> str:
    """``auto`` -> ``dynamic`` for linear-heavy models, ``static`` otherwise; others are checked and returned."""
    if mode not in INT8_MODES:
        raise ConfigError(f"unknown INT8 mode '{mode}'; use one of {', '.join(INT8_MODES)}")
    if mode != "auto":
        return mode
    return "dynamic" if is_linear_heavy(onnx_path) else "static"


# --- FP16 ----------------------------------------------------------------------------------------


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                 op_block_list: Sequence[str] | None = None) -> QuantReport:
    """Convert an FP32 ONNX model to FP16, keeping float32 inputs and outputs.

    Args:
        src: the FP32 model.
        dst: the file to write (atomically).
        op_block_list: op types to keep in FP32 (default: the converter's own list of ops that
            lack FP16 kernels or lose accuracy, e.g. Resize, TopK, RandomNormal).

    Returns:
        A :class:`QuantReport` with ``mode="fp16"``.

    Raises:
        ExportError: the converter fails or writes a model that does not pass the ONNX checker.
    """
    import onnx  # deferred: heavy
    from onnxruntime.transformers.float16 import convert_float_to_float16  # deferred: heavy

    start = time.perf_counter()
    model = onnx.load(str(src))
    try:
        with _quiet_logs():
            half = convert_float_to_float16(
                model, keep_io_types=True, op_block_list=list(op_block_list) if op_block_list else None
            )
        _toposort(half.graph)  # the converter appends its input Casts at the end of the graph
        onnx.checker.check_model(half)
    except Exception as exc:  # the converter raises plain exceptions on graphs it cannot handle
        raise ExportError(f"cannot convert {src} to FP16: {_one_line(exc)}") from exc
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save_model(half, str(tmp))
    return QuantReport(
        precision="fp16", mode="fp16", path=dst, file_bytes=dst.stat().st_size,
        seconds=time.perf_counter() - start, activation_type="float32 io / float16 inside",
        weight_type="float16", op_counts=_op_counts(half),
    )


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the order to the checker to report
            ordered.extend(pending)
            break
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


# --- INT8 ----------------------------------------------------------------------------------------


def _replayable(calibration: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """``calibration`` if it can be iterated again and knows its length (batches decoded on each pass);
    else its batches kept in a list (one-shot iterators: the caller chose to hold them)."""
    if hasattr(calibration, "__len__") and not isinstance(calibration, Iterator):
        return calibration
    return [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]


def _calibration_reader(batches: Iterable[np.ndarray], input_name: str) -> Any:
    """A data reader that feeds the calibrator one batch per ``collect_data`` call.

    ``quantize_static`` with ``CalibStridedMinMax`` (any calibration method, despite the name) calls
    ``set_range`` then ``collect_data`` for each stride; with a stride of one batch the calibrator folds
    each batch into its running min/max or its histograms before the next one is decoded, so its memory
    is one batch's activations, whatever the number of images.
    """
    from onnxruntime.quantization import CalibrationDataReader  # deferred: heavy

    class _Reader(CalibrationDataReader):
        """Streams NCHW float32 batches to the calibrator and counts the images it saw."""

        def __init__(self) -> None:
            self._count = len(batches)  # type: ignore[arg-type]
            self._it = iter(batches)
            self._left = self._count
            self.images = 0

        def __len__(self) -> int:
            return self._count

        def set_range(self, start_index: int, end_index: int) -> None:
            self._left = end_index - start_index  # strides come in order: the next batches of the stream

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None) if self._left > 0 else None
            if batch is None:
                return None
            self._left -= 1
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            self.images += int(batch.shape[0])
            return {input_name: batch}

    return _Reader()


def _prepared(src: Path, tmp: Path) -> tuple[Path, Any]:
    """``src`` pre-processed for quantization with a name on every node, saved in ``tmp``; (path, model)."""
    import onnx  # deferred: heavy

    pre = tmp / "pre.onnx"
    _preprocess(src, pre)
    model = onnx.load(str(pre))
    _name_nodes(model)
    onnx.save_model(model, str(pre))
    return pre, model


def _name_nodes(model: Any) -> None:
    """Give every node a unique name (the quantizer's include/exclude lists address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _preprocess(src: Path, dst: Path) -> None:
    """ORT's quant_pre_process: symbolic shape inference, graph optimization, ONNX shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # deferred: heavy

    try:
        with _quiet_logs():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:  # symbolic shape inference gives up on some graphs: try without it
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without it", _one_line(exc))
        try:
            with _quiet_logs():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception as exc2:
            raise ExportError(f"ONNX Runtime's quant_pre_process fails on {src}: {_one_line(exc2)}") from exc2


def check_exclude(exclude_op_types: Sequence[str]) -> list[str]:
    out = []
    for op in exclude_op_types:
        op = op.strip()
        if not op:
            continue
        if not op[0].isupper():
            raise ConfigError(f"'{op}' is not an ONNX op type; op types are spelled like Conv, MatMul, Add")
        out.append(op)
    return out


def quantize_int8_static(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Iterable[np.ndarray],
    calib_method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = False,
    symmetric_activations: bool = False,
    exclude_op_types: Sequence[str] = (),
    keep_float: Sequence[str] = (),
    calibration_cache: str | os.PathLike[str] | None = None,
) -> QuantReport:
    """Static INT8 quantization in QDQ format, calibrated on images.

    Runs ``quant_pre_process`` first, then ``quantize_static`` with per-channel weight scales.

    Args:
        src: the FP32 model (input ``input``).
        dst: the QDQ model to write (atomically).
        calibration: NCHW float32 batches, prepared as at inference (the eval transform). A sized
            re-iterable source (:class:`~edgetl.export.evaluate.ImageBatches`) is decoded batch by batch
            and never held whole; the calibrator's memory does not grow with the number of images.
        calib_method: ``minmax``, ``entropy`` or ``percentile`` (99.999th).
        per_channel: per-output-channel weight scales (what MobileNets need).
        reduce_range: quantize weights to 7 bits (x86 CPUs without VNNI).
        symmetric_activations: int8 activations with zero point 0 (TensorRT); else uint8 (ORT CPU).
        exclude_op_types: op types to keep in float (e.g. ``["Add", "Mul"]``).
        keep_float: node names to keep in float (see :func:`quantized_layers`), e.g. the layers
            accuracy control found most sensitive.
        calibration_cache: a JSON file of activation ranges (ONNX Runtime's calibration cache): written
            by the first call, read by the next ones, which then skip calibration (``calibration`` may
            be empty) and only re-quantize.

    Returns:
        A :class:`QuantReport` with ``mode="static"``.

    Raises:
        ConfigError: an unknown method, or no calibration images.
        ExportError: pre-processing or quantization fails.
    """
    if calib_method not in CALIB_METHODS:
        raise ConfigError(f"unknown calibration method '{calib_method}'; use one of {', '.join(CALIB_METHODS)}")
    excluded = check_exclude(exclude_op_types)
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="edgetl-quant-") as tmp:
        pre, model = _prepared(src, Path(tmp))
        options = _StaticOptions(
            input_name=model.graph.input[0].name, per_channel=per_channel, reduce_range=reduce_range,
            symmetric_activations=symmetric_activations,
            exclude_nodes=[n.name for n in model.graph.node if n.op_type in excluded or n.name in keep_float],
            cache=None if calibration_cache is None else Path(calibration_cache),
        )
        batches = _replayable(calibration)  # iterated again for a retry with minmax
        if len(batches) == 0 and not (options.cache and options.cache.is_file()):  # type: ignore[arg-type]
            raise ConfigError("no calibration images: pass --calib-data DIR with some images")
        out = Path(tmp) / "int8.onnx"
        used, images, fallback = _quantize_static_or_minmax(pre, out, batches, calib_method, options)
        quantized = _save_copy(out, dst, lambda m: _float_inputs(m, keep_float))
    log.info("static INT8 (%s, %d calibration images) -> %s", used, images, dst)
    return QuantReport(
        precision="int8", mode="static", path=dst, file_bytes=dst.stat().st_size,
        seconds=time.perf_counter() - start, format="QDQ", per_channel=per_channel, reduce_range=reduce_range,
        activation_type="int8" if symmetric_activations else "uint8", weight_type="int8",
        calib_method=used, calib_images=images, calib_fallback=fallback, exclude_op_types=excluded,
        op_counts=_op_counts(quantized), kept_in_float=list(keep_float),
    )


@dataclass(frozen=True)
class _StaticOptions:
    """The settings of a ``quantize_static`` call other than the calibration method."""

    input_name: str
    per_channel: bool
    reduce_range: bool
    symmetric_activations: bool
    exclude_nodes: list[str]
    cache: Path | None = None


def _quantize_static_or_minmax(pre: Path, out: Path, batches: Iterable[np.ndarray], calib_method: str,
                               options: _StaticOptions) -> tuple[str, int, str | None]:
    """Quantize with ``calib_method``, falling back to minmax if it fails; return (method used, images, why)."""
    try:
        return calib_method, _quantize_static(pre, out, batches, calib_method, options), None
    except Exception as exc:  # ORT's quantizer raises ValueError/RuntimeError/... on odd graphs
        if calib_method == "minmax":
            raise ExportError(f"ONNX Runtime static quantization failed: {_one_line(exc)}") from exc
        # The histogram calibrators fail on degenerate activation ranges ("Too many bins for data range").
        fallback = f"{calib_method} calibration failed ({_one_line(exc, 120)}); used minmax"
        log.warning("%s", fallback)
        if options.cache is not None:
            options.cache.unlink(missing_ok=True)  # it may hold the failed method's ranges
    try:
        return "minmax", _quantize_static(pre, out, batches, "minmax", options), fallback
    except Exception as exc2:
        raise ExportError(f"ONNX Runtime static quantization failed: {_one_line(exc2)}") from exc2


def _quantize_static(pre: Path, out: Path, batches: Iterable[np.ndarray], method: str, options: _StaticOptions) -> int:
    """One quantize_static call; returns the number of calibration images it saw."""
    from onnxruntime.quantization import (  # deferred: heavy
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": options.symmetric_activations}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    extra["CalibStridedMinMax"] = 1  # one batch per collect_data call: memory bounded by one batch
    if options.exclude_nodes:
        # The quantizer drops a Relu whose output Q clips at zero; a layer kept in float reads the tensor
        # before that Q (see _float_inputs), so the Relu must stay.
        extra["QDQKeepRemovableActivations"] = True
    reader = _calibration_reader(batches, options.input_name)
    with _quiet_logs():
        quantize_static(
            str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QInt8 if options.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=options.exclude_nodes or None,
            calibrate_method=methods[method], extra_options=extra,
            calibration_cache_path=None if options.cache is None else str(options.cache),
        )
    return reader.images


def quantized_layers(path: str | os.PathLike[str]) -> list[str]:
    """The names of the weighted layers (Conv, Gemm, MatMul) a QDQ model runs in INT8: those whose weight
    comes through a DequantizeLinear, in graph order; :func:`quantize_int8_static` takes them as ``keep_float``."""
    import onnx  # deferred: heavy

    model = onnx.load(str(path), load_external_data=False)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dequantized]


def _float_inputs(model: Any, names: Sequence[str]) -> None:
    """Feed the layers kept in float their float inputs, bypassing the Q/DQ pair in front of them, and drop
    pairs nobody reads any more.

    Otherwise ONNX Runtime's optimizer (WeightBiasQuantization, 1.20+) sees DequantizeLinear -> Conv with a
    float weight and quantizes that weight per tensor at load time: the layer is INT8 again, and worse.
    """
    if not names:
        return
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in names:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    _drop_unread(model, ("QuantizeLinear", "DequantizeLinear"))


def _drop_unread(model: Any, op_types: tuple[str, ...]) -> None:
    """Remove nodes of ``op_types`` whose outputs nothing reads (repeatedly: a DQ, then its Q)."""
    while True:
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in op_types and not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)


def _save_copy(path: Path, dst: Path, edit: Callable[[Any], None] | None = None) -> Any:
    """Copy the ONNX model at ``path`` to ``dst`` (atomically), edited by ``edit``; return the model."""
    import onnx  # deferred: heavy

    model = onnx.load(str(path))
    if edit is not None:
        edit(model)
    with atomic_path(dst) as tmp_dst:
        onnx.save_model(model, str(tmp_dst))
    return model


def quantize_int8_dynamic(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    per_channel: bool = False,
    reduce_range: bool = False,
    exclude_op_types: Sequence[str] = (),
) -> QuantReport:
    """Dynamic INT8 quantization of MatMul/Gemm weights (activations are quantized at run time).

    Args:
        src: the FP32 model.
        dst: the file to write (atomically).
        per_channel: per-channel weight scales.
        reduce_range: 7-bit weights (x86 CPUs without VNNI).
        exclude_op_types: of MatMul/Gemm, the ones to keep in float.

    Returns:
        A :class:`QuantReport` with ``mode="dynamic"``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # deferred: heavy

    excluded = check_exclude(exclude_op_types)
    ops = [op for op in _DYNAMIC_OP_TYPES if op not in excluded]
    if not ops:
        raise ConfigError("dynamic INT8 quantizes MatMul and Gemm only, and both are excluded; drop --exclude-op-types")
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="edgetl-quant-") as tmp:
        pre, _ = _prepared(src, Path(tmp))
        out = Path(tmp) / "int8.onnx"
        try:
            with _quiet_logs():
                quantize_dynamic(str(pre), str(out), op_types_to_quantize=ops, per_channel=per_channel,
                                 reduce_range=reduce_range, weight_type=QuantType.QInt8)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime dynamic quantization failed: {_one_line(exc)}") from exc
        quantized = _save_copy(out, dst)
    return QuantReport(
        precision="int8", mode="dynamic", path=dst, file_bytes=dst.stat().st_size,
        seconds=time.perf_counter() - start, format="dynamic (MatMulInteger/DynamicQuantizeLinear)",
        per_channel=per_channel, reduce_range=reduce_range, activation_type="uint8 (dynamic)",
        weight_type="int8", exclude_op_types=excluded, op_counts=_op_counts(quantized),
    )
