"""The export stage end to end on a tiny fine-tuned run: artifact layout, hashes, precisions, budgets."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgetl._io import sha256_file
from edgetl.cli import cli
from edgetl.data import make_demo_dataset
from edgetl.errors import BudgetExceededError, ConfigError, ExportError
from edgetl.export import api as export_api
from edgetl.export.api import export
from edgetl.finetune.api import finetune
from edgetl.options import EXPORT_PRECISIONS
from edgetl.validate import validate
from edgetl.zoo import quantize

FAST = dict(rounds=3, device="x86")
LAYOUT = {"model.onnx", "labels.json", "preprocess.json", "golden.npz", "manifest.json", "manifest.sha256"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """resnet18 (random init, 32 px) after one linear-probe epoch on a 3-class demo dataset."""
    base = tmp_path_factory.mktemp("export-run")
    data = make_demo_dataset(base / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    torch.set_num_threads(1)
    finetune("resnet18", data, base / "run", weights="none", resolution=32, batch_size=16, epochs=1,
             strategy="linear", device="cpu", progress=False, seed=0)
    return base / "run"


@pytest.fixture(scope="module")
def int8_artifact(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "artifact"
    artifact = export(run_dir, out, precision="int8", c_header=True, **FAST)
    return artifact


def test_layout_and_manifest_hashes(run_dir, int8_artifact):
    out = int8_artifact.path
    assert {p.name for p in out.iterdir()} == LAYOUT | {"model_data.h"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left over
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json", "manifest.sha256"}
    for name, record in manifest["files"].items():
        assert record["sha256"] == sha256_file(out / name)
        assert record["bytes"] == (out / name).stat().st_size
    for pkg in ("edgetl", "torch", "onnx", "onnxruntime"):
        assert manifest["versions"][pkg]
    assert manifest["onnx"]["opset"] == 17
    assert manifest["source"]["model"].startswith("resnet18") and manifest["source"]["kind"] == "run"
    assert manifest["precision"] == "int8" and manifest["status"] == "passed"
    classes = json.loads((run_dir / "splits.json").read_text())["classes"]
    assert json.loads((out / "labels.json").read_text()) == classes and len(classes) == 3
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["crop"]["size"] == [32, 32] and pre["layout"] == "NCHW" and pre["color_order"] == "RGB"
    assert len(pre["mean"]) == len(pre["std"]) == 3
    lat = manifest["latency"]
    assert lat["device"] == "x86-avx2" and lat["runtime"] == "onnxruntime"
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["max_ms"]
    assert "p90_ms" not in lat and "p99_ms" not in lat and lat["runs"] == 3  # too few runs for them
    assert lat["basis"] == "predicted" and lat["judged_on"] == "predicted for x86-avx2"
    acc = manifest["accuracy"]
    assert acc["measured"] and acc["images"] == 12 and 0 <= acc["top1_agreement"] <= 1
    assert acc["drop_pts"] == pytest.approx(acc["fp32_top1"] - acc["top1"], abs=1e-3)


def test_int8_static_is_per_channel_qdq_and_small(int8_artifact):
    model = onnx.load(str(int8_artifact.path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = {i.name: i for i in model.graph.initializer}
    per_channel = [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and int(np.prod(inits[n.input[1]].dims)) > 1
    ]
    assert per_channel, "conv weights must have one scale per output channel"
    quant = int8_artifact.manifest["quantization"]
    assert quant["mode"] == "static" and quant["format"] == "QDQ" and quant["per_channel"]
    assert quant["reduce_range"] is True  # x86-avx2 has no VNNI
    assert quant["calib_images"] == 24  # all 24 training images (fewer than 200), stratified
    sizes = {c["precision"]: c["file_bytes"] for c in int8_artifact.candidates}
    assert sizes["int8"] <= 0.3 * sizes["fp32"]


def test_c_header_holds_the_model_bytes(int8_artifact):
    text = (int8_artifact.path / "model_data.h").read_text()
    assert "alignas(16) static const unsigned char edgetl_model_onnx[] = {" in text
    assert "#ifndef EDGETL_MODEL_DATA_H_" in text and "#define EDGETL_MODEL_NUM_CLASSES 3" in text
    assert "#define EDGETL_MODEL_INPUT_SHAPE {1, 3, 32, 32}" in text
    onnx_bytes = (int8_artifact.path / "model.onnx").read_bytes()
    assert f"#define EDGETL_MODEL_ONNX_LEN {len(onnx_bytes)}u" in text
    body = text.split("edgetl_model_onnx[] = {", 1)[1].split("};", 1)[0]
    assert bytes.fromhex("".join(body.split()).replace("0x", "").replace(",", "")) == onnx_bytes


def test_fp32_parity_and_cli_json(run_dir, tmp_path):
    out = tmp_path / "fp32"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out), "--precision", "fp32",
                                      "--rounds", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout is one JSON document
    assert doc["precision"] == "fp32" and doc["passed"]
    parity = doc["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0 and parity["images"] == 12
    assert doc["onnx"]["nodes_before_simplify"] >= doc["onnx"]["nodes_after_simplify"] > 0
    model = onnx.load(str(out / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]  # dynamic batch, NCHW


@pytest.mark.slow
def test_auto_picks_a_candidate_within_budget(run_dir, tmp_path):
    artifact = export(run_dir, tmp_path / "auto", precision="auto", **FAST)
    cands = {c["precision"]: c for c in artifact.candidates}
    assert set(cands) == {"fp32", "int8"}  # x86-avx2 has no fast fp16
    for c in cands.values():
        assert c["latency"]["min_ms"] > 0 and c["accuracy"]["images"] == 12 and c["file_bytes"] > 0
    chosen = [c for c in artifact.candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["precision"] == artifact.precision
    assert chosen[0]["within_budget"] and chosen[0]["accuracy"]["drop_pts"] <= 1.0
    assert artifact.manifest["requested_precision"] == "auto"
    if artifact.precision == "int8":  # shipped only when faster than fp32 by the margin
        assert cands["int8"]["latency"]["min_ms"] < cands["fp32"]["latency"]["min_ms"]


@pytest.mark.slow
def test_fp16_keeps_float32_io(run_dir, tmp_path):
    artifact = export(run_dir, tmp_path / "fp16", precision="fp16", device="jetson-orin-nano", rounds=3)
    model = onnx.load(str(artifact.path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert artifact.manifest["parity"]["passed"] and artifact.manifest["parity"]["max_abs_diff"] > 0
    assert artifact.latency["basis"] == "predicted" and artifact.latency["predicted_ms"] > 0


def _add_logit_bias(path, num_classes: int, cls: int) -> None:
    """Add a large bias to one class's logit in the ONNX file at ``path``: a broken quantized model."""
    model = onnx.load(str(path))
    logits = model.graph.output[0].name
    bias = np.zeros(num_classes, dtype=np.float32)
    bias[cls] = 1e4
    model.graph.initializer.append(onnx.numpy_helper.from_array(bias, "sabotage_bias"))
    for node in model.graph.node:
        node.output[:] = ["pre_bias" if o == logits else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Add", ["pre_bias", "sabotage_bias"], [logits]))
    onnx.save(model, str(path))


def _labelled_by_fp32(run_dir, dest):
    """The run's val images, filed under the class the FP32 model predicts: FP32 top-1 is 100% there."""
    from edgetl.data import build_transform, load_rgb
    from edgetl.finetune.api import load_trained_model

    trained = load_trained_model(run_dir)
    transform = build_transform(trained.preprocess)
    splits = json.loads((run_dir / "splits.json").read_text())
    counts = dict.fromkeys(trained.classes, 0)
    for name in trained.classes:
        (dest / name).mkdir(parents=True)
    for path, _ in splits["val"]:
        with torch.no_grad():
            cls = trained.classes[int(trained(transform(load_rgb(path))[None]).argmax())]
        shutil.copy(path, dest / cls)
        counts[cls] += 1
    return trained.classes.index(min(counts, key=counts.get))


@pytest.mark.slow
def test_accuracy_drop_over_budget_exits_3_with_the_artifact_written(run_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    rare = _labelled_by_fp32(run_dir, data)
    real = quantize.quantize_int8_static

    def biased(src, dst, *args, **kwargs):
        """The real quantization, then a large bias on the class FP32 predicts least: a broken INT8 model."""
        report = real(src, dst, *args, **kwargs)
        _add_logit_bias(dst, num_classes=3, cls=rare)
        return report

    monkeypatch.setattr(quantize, "quantize_int8_static", biased)
    out = tmp_path / "dropped"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out), "--precision", "int8",
                                      "--data", str(data), "--rounds", "2", "--max-accuracy-drop", "1"])
    assert result.exit_code == 3, result.output
    assert "accuracy drop" in result.stderr and "exceeds the budget of 1 pts" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["accuracy"]["pass"] is False
    assert manifest["accuracy"]["fp32_top1"] == 100.0 and manifest["accuracy"]["drop_pts"] > 50
    assert {p.name for p in out.iterdir()} == LAYOUT


def test_failed_export_leaves_nothing_and_keeps_an_existing_folder(run_dir, tmp_path, monkeypatch):

    real = export_api.export_onnx

    def export_then_fail(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)  # the staging folder now holds a real ONNX file
        raise ExportError("export failed (injected)")

    monkeypatch.setattr(export_api, "export_onnx", export_then_fail)
    out = tmp_path / "new"
    with pytest.raises(ExportError, match="injected"):
        export(run_dir, out, precision="fp32", simplify=False, **FAST)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "model.onnx").write_bytes(b"previous artifact")
    (old / "manifest.json").write_text(json.dumps({"format": "edgetl.artifact"}))  # an artifact: --force may swap it
    with pytest.raises(ConfigError, match="--force"):
        export(run_dir, old, precision="fp32", **FAST)
    with pytest.raises(ExportError, match="injected"):
        export(run_dir, old, precision="fp32", force=True, simplify=False, **FAST)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "model.onnx").read_bytes() == b"previous artifact"


def test_force_swaps_an_existing_folder_and_budget_error_carries_the_artifact(run_dir, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "edgetl.artifact"}))  # an earlier artifact
    (out / "stale.txt").write_text("old")
    with pytest.raises(BudgetExceededError, match="latency") as info:
        export(run_dir, out, precision="fp32", max_latency_ms=1e-6, force=True, **FAST)
    assert {p.name for p in out.iterdir()} == LAYOUT  # written, and the old folder is gone
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    artifact = info.value.artifact
    assert artifact.path == out and artifact.latency["pass"] is False and not artifact.passed
    assert artifact.manifest["status"] == "failed" and "latency" in artifact.manifest["failures"][0]


def test_tensorrt_missing_exits_1_with_the_trtexec_hint(run_dir, tmp_path):
    from edgetl.runtime.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is available here")
    out = tmp_path / "trt"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out), "--precision", "fp16",
                                      "--device", "jetson-orin-nano", "--tensorrt"])
    assert result.exit_code == 1
    assert "trtexec --onnx=model.onnx --saveEngine=model.engine --fp16" in result.stderr
    assert "--tensorrt" in result.stderr and "input:1x3x32x32" in result.stderr
    assert not out.exists()


@pytest.mark.tensorrt
def test_tensorrt_engine_build(run_dir, tmp_path):
    artifact = export(run_dir, tmp_path / "trt", precision="fp16", device="jetson-orin-nano", tensorrt=True,
                      rounds=3)
    assert (artifact.path / "model.engine").stat().st_size > 0
    info = artifact.manifest["tensorrt"]
    assert info["precision"] == "fp16" and info["tensorrt_version"] and "." in info["compute_capability"]
    assert artifact.manifest["versions"]["tensorrt"] == info["tensorrt_version"]
    assert "model.engine" in artifact.manifest["files"]
    # the engine's outputs were checked against FP32 before it shipped, and it was timed
    check = info["check"]
    assert check["top1_agreement_with_fp32"] >= check["min_top1_agreement"] == 0.99 and check["images"] == 12
    assert info["latency"]["p50_ms"] > 0 and info["latency"]["runs"] >= 100
    lat = artifact.latency
    assert lat["measured_with"] == "tensorrt (model.engine)" and lat["p50_ms"] == info["latency"]["p50_ms"]
    # a GPU box is not a Jetson Orin Nano: the budget is the device's prediction, as validate judges it
    assert lat["basis"] == "predicted"
    report = validate(artifact.path, data=run_dir.parent / "demo" / "val", iterations=100, warmup=5, write=False)
    assert report.runtime == "tensorrt" and report.latency["basis"] == "predicted"
    assert report.accuracy["runtime"] == "tensorrt" and report.accuracy["top1_agreement_with_onnx"] >= 0.99


def test_catalog_model_needs_weights_and_exports_imagenet_labels(tmp_path):
    with pytest.raises(ConfigError, match="--weights imagenet"):
        export("resnet18", tmp_path / "x", precision="fp32")
    artifact = export("resnet18", tmp_path / "cat", precision="fp32", weights="none", resolution=32,
                      rounds=2, simplify=False)
    labels = json.loads((artifact.path / "labels.json").read_text())
    assert len(labels) == 1000 and labels[0] == "tench"
    assert artifact.accuracy["measured"] is False and artifact.manifest["parity"]["passed"]
    assert artifact.manifest["source"]["kind"] == "catalog"


def test_bad_options_fail_before_any_work(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="op type"):
        export(run_dir, tmp_path / "a", precision="int8", exclude_op_types=["conv"])
    with pytest.raises(ConfigError, match="precision"):
        export(run_dir, tmp_path / "a", precision="int4")
    from edgetl.errors import ProfileError

    with pytest.raises(ProfileError, match="int8"):
        export(run_dir, tmp_path / "a", precision="int8", device="jetson-nano")
    assert not (tmp_path / "a").exists()
    assert EXPORT_PRECISIONS == ("fp32", "fp16", "int8", "auto")


@pytest.mark.slow
def test_cli_quantization_options_reach_the_manifest(run_dir, tmp_path):
    out = tmp_path / "vnni"
    result = CliRunner().invoke(cli, [
        "export", str(run_dir), "--out", str(out), "--precision", "int8", "--device", "x86-avx512-vnni",
        "--calib-method", "percentile", "--exclude-op-types", "Add", "--opset", "18", "--rounds", "2",
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert quant["reduce_range"] is False  # VNNI: full 8-bit weights
    assert quant["calib_method"] == "percentile" and "Add" in quant["exclude_op_types"]
    assert manifest["onnx"]["opset"] == 18
    assert "Add" in quant["op_counts"]  # the residual adds stayed in float


def test_out_that_holds_the_run_is_refused(run_dir):
    with pytest.raises(ConfigError, match="holds the run"):
        export(run_dir, run_dir.parent, precision="fp32", force=True, **FAST)
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.slow
def test_unlabelled_int8_must_agree_with_fp32(tmp_path, monkeypatch):
    """A catalog classifier with calibration images but no labels: agreement with FP32 gates INT8."""
    calib = make_demo_dataset(tmp_path / "calib", num_classes=2, train_per_class=8, val_per_class=0, size=32)
    real = quantize.quantize_int8_static

    def broken(src, dst, *args, **kwargs):
        report = real(src, dst, *args, **kwargs)
        _add_logit_bias(dst, num_classes=1000, cls=999)  # every image becomes class 999
        return report

    monkeypatch.setattr(quantize, "quantize_int8_static", broken)
    artifact = export("resnet18", tmp_path / "auto", precision="auto", weights="none", resolution=32,
                      calibration={"data": calib}, simplify=False, **FAST)
    int8 = next(c for c in artifact.candidates if c["precision"] == "int8")
    assert artifact.precision == "fp32"
    assert int8["parity"]["inputs"] == "calibration images" and int8["parity"]["min_top1_agreement"] == 0.99
    # accuracy control tried keeping layers in float, but no layer explains a bias added after the model
    control = int8["quantization"]["accuracy_control"]
    assert control["passed"] is False and control["kept_in_float"] == [] and len(control["sensitivity"]) == 21
    assert not int8["parity"]["passed"] and "agreement" in int8["rejected"]

    with pytest.raises(BudgetExceededError, match=r"agrees with PyTorch on 0\.0% of the calibration images"):
        export("resnet18", tmp_path / "int8", precision="int8", weights="none", resolution=32,
               calibration={"data": calib}, simplify=False, **FAST)
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())  # written for inspection
    assert manifest["status"] == "failed" and manifest["accuracy"]["pass"] is False
