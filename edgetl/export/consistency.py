"""Checks that an artifact's files agree with each other, beyond their hashes.

A manifest whose hashes match can still describe the wrong model: hashes prove that nothing changed
after export, not that what was shipped is what the manifest claims. :func:`check_consistency` checks:

- the manifest's fields have the types edgetl writes (``device`` a mapping, ``precision`` a name...);
- ``labels.json`` is a list of distinct names, as many as the model has outputs;
- the graph's precision is the one claimed: quantization ops for ``int8``, float16 weights for
  ``fp16``, neither for ``fp32``;
- ``preprocess.json`` is valid (:func:`edgetl.data.preprocess.read_spec`: finite, three channels, std > 0,
  sane sizes, known names), and the graph takes one float input ``input`` of the shape it gives, and returns
  ``logits``;
- ``model_data.h`` (when present) names the manifest's digest and the model's length.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import onnx

from edgetl.data.preprocess import read_spec
from edgetl.errors import ArtifactError
from edgetl.export import bundle
from edgetl.options import BUDGET_METRICS, PRECISIONS

QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul",
})
_FLOAT16 = onnx.TensorProto.FLOAT16
_MAPPINGS = ("device", "source", "onnx")
_OPTIONAL_MAPPINGS = ("latency", "quantization")
"""Read when present: an older artifact may lack them (validate then predicts and judges as it did)."""


def check_consistency(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`ArtifactError` when the artifact's files contradict each other (see the module doc)."""
    check_manifest_fields(folder, manifest)
    labels = bundle.read_labels(folder)
    spec = read_spec(folder / bundle.PREPROCESS_FILE)
    model = _load_graph(folder)
    _check_precision(folder, manifest["precision"], model)
    _check_io(folder, model, spec.input_shape, len(labels))
    if bundle.HEADER_FILE in manifest["files"]:
        _check_header(folder, manifest)


def check_manifest_fields(folder: Path, manifest: dict[str, Any]) -> None:
    """The fields validate reads must have the types export writes."""
    where = folder / bundle.MANIFEST_FILE
    for key in _MAPPINGS:
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{where}: '{key}' must be a mapping, got {manifest.get(key)!r}; "
                                "re-export the artifact")
    if not isinstance(manifest["device"].get("name"), str):
        raise ArtifactError(f"{where}: device.name must be a profile name, got {manifest['device'].get('name')!r}")
    for key in _OPTIONAL_MAPPINGS:
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise ArtifactError(f"{where}: '{key}' must be a mapping or null, got {manifest[key]!r}; "
                                "re-export the artifact")
    metric = (manifest.get("latency") or {}).get("budget_metric")
    if metric is not None and metric not in BUDGET_METRICS:
        raise ArtifactError(f"{where}: latency.budget_metric must be one of {', '.join(BUDGET_METRICS)}, "
                            f"got {metric!r}; re-export the artifact")
    if manifest.get("precision") not in PRECISIONS:
        raise ArtifactError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {manifest.get('precision')!r}; re-export the artifact")


def _load_graph(folder: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(folder / bundle.MODEL_FILE), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: any parse failure means not a model
        raise ArtifactError(f"{folder / bundle.MODEL_FILE} is not an ONNX model ({exc}); re-export the artifact") \
            from None


def graph_precision(model: onnx.ModelProto) -> str:
    """``int8`` with quantization ops, ``fp16`` with float16 weights, else ``fp32``."""
    ops = {node.op_type for node in model.graph.node}
    if ops & QUANT_OPS:
        return "int8"
    if any(t.data_type == _FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def _check_precision(folder: Path, claimed: str, model: onnx.ModelProto) -> None:
    found = graph_precision(model)
    if found != claimed:
        raise ArtifactError(
            f"the manifest of {folder} says {claimed}, but model.onnx is an {found} graph; "
            "the files do not belong together, re-export the artifact"
        )


def _dims(value_info: Any) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_io(folder: Path, model: onnx.ModelProto, expected: list[int], num_labels: int) -> None:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if [i.name for i in inputs] != ["input"] or [o.name for o in outputs] != ["logits"]:
        raise ArtifactError(
            f"model.onnx in {folder} must take 'input' and return 'logits', it takes "
            f"{[i.name for i in inputs]} and returns {[o.name for o in outputs]}; re-export the artifact"
        )
    got = _dims(inputs[0])
    if len(got) != 4 or got[1:] != expected[1:]:
        raise ArtifactError(
            f"model.onnx in {folder} takes input of shape {got}, preprocess.json gives {expected}; "
            "the files do not belong together, re-export the artifact"
        )
    classes = _dims(outputs[0])[-1:] or [None]
    if classes[0] != num_labels:
        raise ArtifactError(
            f"model.onnx in {folder} has {classes[0]} outputs, labels.json names {num_labels} classes; "
            "the files do not belong together, re-export the artifact"
        )


def _check_header(folder: Path, manifest: dict[str, Any]) -> None:
    text = (folder / bundle.HEADER_FILE).read_text(encoding="ascii", errors="replace")
    digest = re.search(r'#define EDGETL_MANIFEST_SHA256 "([0-9a-f]{64})"', text)
    length = re.search(r"#define EDGETL_MODEL_ONNX_LEN (\d+)u", text)
    if digest is None or digest.group(1) != bundle.manifest_digest(manifest):
        raise ArtifactError(f"{bundle.HEADER_FILE} in {folder} does not name this manifest's digest; "
                            "re-export the artifact")
    if length is None or int(length.group(1)) != (folder / bundle.MODEL_FILE).stat().st_size:
        raise ArtifactError(f"{bundle.HEADER_FILE} in {folder} does not hold this model.onnx; re-export the artifact")
