"""The two ONNX exporters, the choice between them, and what to say when both fail.

Which exporter: ``exporter="auto"`` (the default) uses the TorchScript exporter
(``torch.onnx.export(dynamo=False)``) and falls back to the dynamo exporter when TorchScript cannot
export the model (an operator it lacks, such as ``aten::fft_fft2``) or is no longer in torch.
Measured on torchvision CNNs and ViTs (224 px, random init) with torch 2.14.1 and onnxslim 0.1.98:

- After onnxslim both give graphs of the same size (resnet18 49 vs 49 nodes, mobilenet_v3_small 122
  vs 122, convnext_tiny 256 vs 263, vit_b_16 555 vs 575) and the same ONNX Runtime latency.
- TorchScript honours the requested opset; dynamo translates at opset 18 and its down-conversion
  to 17 fails for CNNs (resnet18 and efficientnet_b0 stay at opset 18), which older TensorRT and
  ONNX Runtime builds on devices reject.
- dynamo specialises a batch dimension of size 1 in the example input (ViT comes out with a fixed
  batch of 1 unless the example batch is 2 or more); TorchScript's ``dynamic_axes`` stays dynamic.
- TorchScript exports in about 1 s where dynamo takes 7-35 s.

When the export fails on an operator, the message names it and the innermost module that calls it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgetl.errors import ExportError
from edgetl.runtime.base import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

BATCH_DIM = "batch"
EXPORTERS = ("auto", "torchscript", "dynamo")

_ATEN_OP = re.compile(r"aten(?:::|\.)([A-Za-z_][A-Za-z0-9_]*)")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence the exporters' prints and warnings (stdout must stay clean for --json); log them."""
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buf):
        warnings.simplefilter("always")
        try:
            yield buf
        finally:
            for w in caught:
                log.debug("exporter warning: %s", str(w.message).splitlines()[0] if str(w.message) else w)
            if buf.getvalue().strip():
                log.debug("exporter output:\n%s", buf.getvalue().strip())


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's message as one line without colour codes (an exporter's real cause, when it gives one)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # the dynamo exporter puts the real cause after a generic preamble
        if "No ONNX function found" in ln or "Unsupported" in ln:
            return ln[:limit]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _failed_op(exc: BaseException) -> str | None:
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        match = _ATEN_OP.search(str(err))
        if match:
            return match.group(1)
    return None


def _locate_op(model: torch.nn.Module, example: torch.Tensor, op: str) -> str | None:
    """Find the innermost module that calls ``op`` (an aten name such as ``fft_fft2``) on ``example``."""
    import torch  # deferred: heavy
    from torch.overrides import TorchFunctionMode  # deferred: heavy
    from torch.utils._python_dispatch import TorchDispatchMode  # deferred: heavy

    stack: list[str] = []
    found: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def label() -> str:
        path = stack[-1] if stack else ""
        module = model.get_submodule(path) if path else model
        return f"'{path}' ({type(module).__name__})" if path else f"the top-level {type(module).__name__}"

    def matches(name: str) -> bool:
        return name == op or (op.endswith("_" + name) and len(name) > 2)

    class _Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not found and matches(getattr(func, "__name__", "")):
                found.append(label())
            return func(*args, **(kwargs or {}))

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and func.overloadpacket.__name__ == op:
                found.append(label())
            return func(*args, **(kwargs or {}))

    def pre(module, _inputs):
        stack.append(names.get(id(module), ""))

    def post(module, _inputs, _output):
        if stack:
            stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), _Functions(), _Ops():
            model(example)
    except Exception as exc:  # locating is best effort; the export error is what matters
        log.debug("could not locate %s: %s", op, exc)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _export_error(model: torch.nn.Module, example: torch.Tensor, exc: BaseException, opset: int,
                  exporter: str) -> ExportError:
    op = _failed_op(exc)
    if op is None:
        return ExportError(f"cannot export the model to ONNX opset {opset} ({exporter} exporter): {one_line(exc)}")
    where = _locate_op(model, example, op)
    msg = f"cannot export the model to ONNX opset {opset}: operator aten::{op} is not supported"
    if where:
        msg += f", used in module {where}"
    msg += "; replace that operation with supported ones, or try another opset or exporter"
    return ExportError(msg)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                        dynamic_batch: bool) -> None:
    import torch  # deferred: heavy

    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with quiet():
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
            do_constant_folding=True, export_params=True,
        )


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                   dynamic_batch: bool) -> None:
    import onnx  # deferred: heavy
    import torch  # deferred: heavy

    dynamic_shapes = None
    if dynamic_batch:
        # torch.export specialises dimensions of size 1; an example batch of 2 keeps it symbolic.
        if example.shape[0] == 1:
            example = torch.cat([example, example])
        dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},)
    with quiet():
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, opset_version=opset, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes,
            optimize=True,
        )
    proto = program.model_proto
    written = opset_of(proto)
    if written != opset:
        try:
            converted = onnx.version_converter.convert_version(proto, opset)
            # The converter can emit invalid nodes (ReduceMean-18 attributes at 17): check its work.
            onnx.checker.check_model(converted, full_check=True)
            proto = converted
        except Exception as exc:  # no adapter for some ops (e.g. Reduce* with axes inputs, 18 -> 17)
            log.warning(
                "the dynamo exporter wrote opset %d, which cannot be converted to %d (%s); keeping opset %d",
                written, opset, one_line(exc, 120), written,
            )
    onnx.save_model(proto, str(path))


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 if it declares none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def run_exporters(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                  dynamic_batch: bool, exporter: str) -> str:
    """Export with the chosen exporter (``auto``: TorchScript, then dynamo); return the one used."""
    first: BaseException | None = None
    if exporter in ("auto", "torchscript"):
        try:
            _export_torchscript(model, example, path, opset, dynamic_batch)
            return "torchscript"
        except Exception as exc:  # exporter errors come in many types (UnsupportedOperatorError, ...)
            if exporter == "torchscript":
                raise _export_error(model, example, exc, opset, "torchscript") from exc
            first = exc
            log.info("the TorchScript exporter failed (%s); trying the dynamo exporter", one_line(exc, 150))
    try:
        _export_dynamo(model, example, path, opset, dynamic_batch)
        return "dynamo"
    except Exception as exc:
        if first is not None and _failed_op(first) is not None:  # name the op TorchScript reported
            raise _export_error(model, example, first, opset, "torchscript") from exc
        raise _export_error(model, example, exc, opset, "dynamo") from exc
