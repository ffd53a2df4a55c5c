"""Write a PyTorch image model as a checked, simplified ONNX file: the export that stages and benchmarks share.

Every exported model follows one convention: input ``input`` (NCHW float32, batch dimension
``batch`` when dynamic), output ``logits``. The graph comes from :mod:`edgetl.zoo.onnx_exporters`, is
checked, simplified with onnxslim where that keeps it valid, and written atomically.

torch, onnx, onnxruntime and onnxslim are imported inside the functions that use them, so importing
this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from edgetl._io import atomic_path
from edgetl.errors import ConfigError, ExportError
from edgetl.runtime.base import INPUT_NAME, OUTPUT_NAME
from edgetl.zoo.onnx_exporters import EXPORTERS, one_line, opset_of, quiet, run_exporters

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class OnnxExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: the default-domain opset of the file (may differ from the one asked for with dynamo).
        exporter: ``torchscript`` or ``dynamo``.
        nodes_exported: nodes in the graph as the exporter produced it.
        nodes: nodes in the file (after onnxslim, if it was applied).
        simplified: whether onnxslim's result was kept.
        simplify_error: why onnxslim's result was not kept, if it was not.
        input_names, output_names: graph input and output names (``input``, ``logits``).
        input_shapes, output_shapes: by name; a dynamic dimension is its name (``batch``).
        dynamic_batch: whether the batch dimension is dynamic.
        op_counts: node count by op type in the file.
        file_bytes: the file's size.
        export_seconds: wall time of the whole export.
        max_abs_diff: with ``check``, the largest |ONNX Runtime - PyTorch| difference on a random
            batch (a batch one larger than exported when the batch is dynamic, to prove it is).
    """

    path: Path
    opset: int
    exporter: str
    nodes_exported: int
    nodes: int
    simplified: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: dict[str, list[int | str]]
    output_shapes: dict[str, list[int | str]]
    dynamic_batch: bool
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    export_seconds: float = 0.0
    simplify_error: str | None = None
    max_abs_diff: float | None = None

    @property
    def nodes_before(self) -> int:
        """Alias of ``nodes_exported``: nodes before simplification."""
        return self.nodes_exported

    @property
    def nodes_after(self) -> int:
        """Alias of ``nodes``: nodes after simplification."""
        return self.nodes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (paths as strings, tuples as lists)."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["input_names"] = list(self.input_names)
        d["output_names"] = list(self.output_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnnxExportReport:
        """The report :meth:`to_dict` wrote."""
        d = dict(d)
        d["path"] = Path(d["path"])
        d["input_names"] = tuple(d["input_names"])
        d["output_names"] = tuple(d["output_names"])
        return cls(**d)


# --- helpers -----------------------------------------------------------------------------------


def _resolution_hw(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        h = w = resolution
    else:
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"resolution must be an int or (height, width), got {resolution!r}") from exc
    if h < 1 or w < 1:
        raise ConfigError(f"resolution must be positive, got {resolution!r}")
    return h, w


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without any)."""
    import torch  # deferred: heavy

    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_meta:
            raise ExportError(
                "the model's weights are on the meta device; build it with real (or random) weights to export it"
            )
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put the model in eval mode for the block; restore its train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _io_shapes(values: Any) -> dict[str, list[int | str]]:
    shapes: dict[str, list[int | str]] = {}
    for value in values:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]
    return shapes


def _ort_session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort  # deferred: heavy

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Checking needs the graph as written, and an unoptimised session is quick to create.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _ort_session(model).run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _simplify(model: onnx.ModelProto, reference: tuple[np.ndarray, np.ndarray] | None
              ) -> tuple[onnx.ModelProto | None, np.ndarray | None, str | None]:
    """Run onnxslim; return (model, its output on the reference input, None) if valid, else (None, None, why)."""
    import onnx  # deferred: heavy
    import onnxslim  # deferred: heavy

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnxslim edits its input in place; the exported graph is the fallback
    try:
        with quiet():
            slim = onnxslim.slim(copy)
    except Exception as exc:  # onnxslim raises anything on graphs it does not handle
        return None, None, f"onnxslim failed: {one_line(exc)}"
    if slim is None:
        return None, None, "onnxslim returned no model"
    if _io_shapes(slim.graph.input) != _io_shapes(model.graph.input) or [o.name for o in slim.graph.output] != [
        o.name for o in model.graph.output
    ]:
        return None, None, "onnxslim changed the model's inputs or outputs"
    got = None
    if reference is not None:
        x, expected = reference
        try:
            got = _run(slim, x)
        except Exception as exc:
            return None, None, f"onnxslim's model does not run: {one_line(exc)}"
        tol = 1e-4 + 1e-3 * float(np.abs(expected).max())
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= tol:
            return None, None, f"onnxslim's model differs from the exported one by {diff:.3g} (> {tol:.3g})"
    return slim, got, None


# --- public API --------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, path: str | os.PathLike[str], resolution: int | tuple[int, int] = 224,
                batch: int = 1, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, check: bool = True,
                simplify: bool = True, exporter: str = "auto", in_channels: int = 3) -> OnnxExportReport:
    """Export a PyTorch image model to ONNX: input ``input`` (NCHW float32), output ``logits``.

    The model is traced in eval mode on its own device with a random batch (its train/eval mode is
    restored afterwards). The graph is checked (``onnx.checker`` with strict shape inference), then
    simplified with onnxslim; a simplification that fails, or that changes the model's inputs,
    outputs or results, is dropped with a warning and the exported graph is kept. With ``check``,
    ONNX Runtime runs the final graph on a batch one larger than ``batch`` (when the batch is
    dynamic), which proves the batch really is dynamic, and the difference from PyTorch is reported.
    The file is written atomically: a failed export leaves nothing at ``path``.

    Args:
        model: the network; it takes one NCHW tensor and returns one tensor of logits.
        path: the ``.onnx`` file to write.
        resolution: input height and width (an int, or ``(height, width)``).
        batch: the batch of the example input (and the fixed batch when not ``dynamic_batch``).
        opset: the ONNX default-domain opset.
        dynamic_batch: make the batch dimension dynamic (named ``batch``).
        check: run the ONNX checker, and verify the graph with ONNX Runtime.
        simplify: simplify the graph with onnxslim.
        exporter: ``auto`` (TorchScript, else dynamo), ``torchscript`` or ``dynamo``.
        in_channels: channels of the input image.

    Returns:
        An :class:`OnnxExportReport`.

    Raises:
        ExportError: the model cannot be exported (the message names an unsupported operator and the
            module that uses it), fails the checker, or is not batch-dynamic as asked.
        ConfigError: bad arguments.
    """
    _check_arguments(model, batch, opset, exporter)
    height, width = _resolution_hw(resolution)
    path, start = Path(path), time.perf_counter()
    example, check_input = _example_inputs(model, (batch, in_channels, height, width), dynamic_batch)
    with eval_mode(model):
        expected = _run_model(model, example, check_input if check else None)
        exported, used = _export_graph(model, example, opset, dynamic_batch, exporter)
    _check_io_names(exported)
    reference = _ort_reference(exported, check_input, expected, dynamic_batch) if check else None
    final = _final_graph(exported, reference, simplify, check)
    _save(final.model, path, used)
    report = _report(final, path, used, len(exported.graph.node), time.perf_counter() - start)
    if dynamic_batch and not report.dynamic_batch:
        log.warning("the exported model's batch dimension is fixed at %s", report.input_shapes[INPUT_NAME][0])
    log.info(
        "exported %s (%s exporter, opset %d, %d -> %d nodes, %.1f MB) in %.1f s",
        path, used, report.opset, report.nodes_exported, report.nodes, report.file_bytes / 1e6, report.export_seconds,
    )
    return report


class _Reference(NamedTuple):
    """A check input, and what ONNX Runtime (on the exported graph) and PyTorch return for it."""

    x: np.ndarray
    onnx_out: np.ndarray
    torch_out: np.ndarray


@dataclass
class _FinalGraph:
    """The graph to write, and what simplifying it did."""

    model: onnx.ModelProto
    simplified: bool
    simplify_error: str | None
    max_abs_diff: float | None


def _check_arguments(model: torch.nn.Module, batch: int, opset: int, exporter: str) -> None:
    import onnx  # deferred: heavy
    import torch  # deferred: heavy

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter '{exporter}'; use one of {', '.join(EXPORTERS)}")
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    if not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset {opset} is out of range; use 7 to {onnx.defs.onnx_opset_version()} (17 is safe)")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")


def _example_inputs(model: torch.nn.Module, shape: tuple[int, int, int, int], dynamic_batch: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch on the model's device, and a CPU check batch (one larger when dynamic)."""
    import torch  # deferred: heavy

    batch, *chw = shape
    device = module_device(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, *chw, generator=generator).to(device)
    check_batch = batch + 1 if dynamic_batch else batch
    return example, torch.randn(check_batch, *chw, generator=generator)


def _run_model(model: torch.nn.Module, example: torch.Tensor, check_input: torch.Tensor | None
               ) -> torch.Tensor | None:
    """Run the model on ``example`` (it must return one tensor); return its output on ``check_input``."""
    import torch  # deferred: heavy

    try:
        with torch.no_grad():
            out = model(example)
            expected = model(check_input.to(example.device)) if check_input is not None else None
    except Exception as exc:  # any failure of the model itself on this input
        raise ExportError(
            f"the model fails on a {list(example.shape)} input before export: {one_line(exc)}; "
            "check the resolution and channels"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise ExportError(
            f"the model returns {type(out).__name__}; edgetl exports models with one logits tensor "
            "(wrap it to return only the logits)"
        )
    return expected


def _export_graph(model: torch.nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool,
                  exporter: str) -> tuple[onnx.ModelProto, str]:
    """Export through a temporary file; return the graph and the exporter used."""
    import onnx  # deferred: heavy

    with tempfile.TemporaryDirectory(prefix="edgetl-onnx-") as tmp:
        raw_path = Path(tmp) / "exported.onnx"
        used = run_exporters(model, example, raw_path, opset, dynamic_batch, exporter)
        return onnx.load(str(raw_path)), used


def _check_io_names(exported: onnx.ModelProto) -> None:
    in_names = [i.name for i in exported.graph.input]
    out_names = [o.name for o in exported.graph.output]
    if in_names != [INPUT_NAME] or out_names[:1] != [OUTPUT_NAME] or len(out_names) != 1:
        raise ExportError(
            f"exported graph has inputs {in_names} and outputs {out_names}; expected [input] and [logits]"
        )


def _ort_reference(exported: onnx.ModelProto, check_input: torch.Tensor, expected: torch.Tensor,
                   dynamic_batch: bool) -> _Reference:
    """Run the exported graph with ONNX Runtime on the check input; it must load, run and match PyTorch's shape."""
    x = check_input.numpy()
    ref = expected.detach().float().cpu().numpy()
    try:
        session = _ort_session(exported)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {one_line(exc)}") from exc
    try:
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime cannot run the exported model on a {list(x.shape)} input: {one_line(exc)}"
            + ("; the graph has a fixed batch size baked in: export with dynamic_batch=False"
               if dynamic_batch else "")
        ) from exc
    if got.shape != ref.shape:
        raise ExportError(
            f"the exported model returns {list(got.shape)} for a {list(x.shape)} input where PyTorch "
            f"returns {list(ref.shape)}; the graph is not batch-dynamic: export with dynamic_batch=False"
        )
    return _Reference(x, got, ref)


def _final_graph(exported: onnx.ModelProto, reference: _Reference | None, simplify: bool, check: bool
                 ) -> _FinalGraph:
    """The simplified graph if onnxslim's result is valid, else the exported one (checked, with ``check``)."""
    final, final_out, simplified, simplify_error = exported, reference.onnx_out if reference else None, False, None
    if simplify:
        slim, slim_out, simplify_error = _simplify(exported, reference[:2] if reference else None)
        if slim is not None and check:
            try:
                slim = _checked(slim)
            except ExportError as exc:
                slim, simplify_error = None, str(exc)
        if slim is not None:
            final, final_out, simplified = slim, slim_out, True
        else:
            log.warning("keeping the unsimplified ONNX graph: %s", simplify_error)
    if check and not simplified:
        final = _checked(final)
    max_abs_diff = float(np.abs(final_out - reference.torch_out).max()) if final_out is not None else None
    return _FinalGraph(final, simplified, simplify_error, max_abs_diff)


def _save(model: onnx.ModelProto, path: Path, exporter: str) -> None:
    """Stamp the exporter in the metadata and write the file atomically."""
    import onnx  # deferred: heavy

    del model.metadata_props[:]
    model.metadata_props.add(key="edgetl.exporter", value=exporter)
    try:
        with atomic_path(path) as tmp_file:
            onnx.save_model(model, str(tmp_file))
    except ValueError as exc:  # protobuf refuses models over 2 GB
        raise ExportError(f"cannot write {path}: {one_line(exc)}; the model is too large for one ONNX file") from exc


def _report(final: _FinalGraph, path: Path, exporter: str, nodes_exported: int, seconds: float) -> OnnxExportReport:
    graph = final.model.graph
    input_shapes = _io_shapes(graph.input)
    return OnnxExportReport(
        path=path,
        opset=opset_of(final.model),
        exporter=exporter,
        nodes_exported=nodes_exported,
        nodes=len(graph.node),
        simplified=final.simplified,
        input_names=tuple(input_shapes),
        output_names=tuple(o.name for o in graph.output),
        input_shapes=input_shapes,
        output_shapes=_io_shapes(graph.output),
        dynamic_batch=isinstance(input_shapes[INPUT_NAME][0], str),
        op_counts=dict(sorted(Counter(n.op_type for n in graph.node).items())),
        file_bytes=path.stat().st_size,
        export_seconds=seconds,
        simplify_error=final.simplify_error,
        max_abs_diff=final.max_abs_diff,
    )


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run shape inference (keeping the inferred shapes) and the full ONNX checker."""
    import onnx  # deferred: heavy

    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported ONNX model fails the ONNX checker: {one_line(exc)}") from exc
    return model
