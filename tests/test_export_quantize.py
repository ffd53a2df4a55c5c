"""FP16 conversion, INT8 quantization and the artifact bundle helpers, on tiny models (fast)."""

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgetl.errors import ArtifactError, ConfigError
from edgetl.export import bundle, quantize
from edgetl.export.evaluate import stratified_sample
from edgetl.onnx_io import export_onnx


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Mixer(nn.Module):
    """Patch embedding by one conv, then token MLPs: linear-heavy, like a ViT."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, stride=8)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(3)])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "conv.onnx"
    export_onnx(ConvNet().eval(), path, resolution=32)
    return path


@pytest.fixture(scope="module")
def mixer_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "mixer.onnx"
    export_onnx(Mixer().eval(), path, resolution=32)
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


def _calib(n=16, seed=0):
    """Batches of 4, 4, ... and a last smaller one, as an image loader yields them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    return [x[i : min(i + 4, n - 1)] for i in range(0, n - 1, 4)] + [x[n - 1 :]]


def test_fp16_keeps_float32_io_and_is_close(conv_onnx, tmp_path):
    report = quantize.convert_fp16(conv_onnx, tmp_path / "fp16.onnx")
    model = onnx.load(str(report.path))
    onnx.checker.check_model(model)  # topologically sorted, valid
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(i.data_type != onnx.TensorProto.FLOAT for i in model.graph.initializer if len(i.dims) > 1)
    x = _calib(4)[0]
    ref, got = _run(conv_onnx, x), _run(report.path, x)
    assert np.abs(got - ref).max() <= 1e-3 + 1e-2 * np.abs(ref).max()
    assert report.file_bytes < conv_onnx.stat().st_size


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_is_qdq_per_channel(conv_onnx, tmp_path, method):
    report = quantize.quantize_int8_static(conv_onnx, tmp_path / "int8.onnx", _calib(), calib_method=method,
                                           reduce_range=True)
    assert report.calib_images == 16 and report.format == "QDQ" and report.calib_method == method
    model = onnx.load(str(report.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq and all(int(np.prod(inits[n.input[1]].dims)) == inits[n.input[0]].dims[0] for n in weight_dq)
    if method == "minmax":  # a small model stays close to FP32
        x = _calib(4, seed=1)[0]
        ref, got = _run(conv_onnx, x), _run(report.path, x)
        assert np.abs(got - ref).max() < 0.2 * np.abs(ref).max() + 1e-3


def test_static_int8_for_tensorrt_is_symmetric_and_excludes_ops(conv_onnx, tmp_path):
    report = quantize.quantize_int8_static(conv_onnx, tmp_path / "trt.onnx", _calib(), symmetric_activations=True,
                                           exclude_op_types=["Gemm"])
    model = onnx.load(str(report.path))
    inits = {i.name: i for i in model.graph.initializer}
    q_zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in q_zero_points)
    assert all(not np.any(onnx.numpy_helper.to_array(z)) for z in q_zero_points)
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert gemm and all(not inits.get(i) or inits[i].data_type == onnx.TensorProto.FLOAT for i in gemm[0].input)


def test_static_int8_needs_images(conv_onnx, tmp_path):
    with pytest.raises(ConfigError, match="calibration images"):
        quantize.quantize_int8_static(conv_onnx, tmp_path / "x.onnx", [])
    assert not (tmp_path / "x.onnx").exists()


def test_dynamic_int8_for_linear_heavy_models(conv_onnx, mixer_onnx, tmp_path):
    assert quantize.is_linear_heavy(mixer_onnx) and not quantize.is_linear_heavy(conv_onnx)
    assert quantize.resolve_int8_mode("auto", mixer_onnx) == "dynamic"
    assert quantize.resolve_int8_mode("auto", conv_onnx) == "static"
    report = quantize.quantize_int8_dynamic(mixer_onnx, tmp_path / "dyn.onnx")
    ops = set(report.op_counts)
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    x = _calib(4)[0]
    ref, got = _run(mixer_onnx, x), _run(report.path, x)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 0.2 * np.abs(ref).max() + 1e-3


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_c_header_compiles_as_c_and_cpp(conv_onnx, tmp_path):
    bundle.write_c_header(tmp_path, conv_onnx, ["batch", 3, 32, 32], ["batch", 4], 4, "fp32", "convnet")
    header = tmp_path / bundle.HEADER_FILE
    text = header.read_text()
    assert "alignas(16) static const unsigned char edgetl_model_onnx[] = {" in text
    assert "#define EDGETL_MODEL_BATCH_DYNAMIC 1" in text and "#define EDGETL_MODEL_OUTPUT_SHAPE {1, 4}" in text
    use = (
        f'#include "{header}"\n#include "{header}"\n'  # the include guard makes a second include harmless
        "static const int in_shape[] = EDGETL_MODEL_INPUT_SHAPE;\n"
        "static const int out_shape[] = EDGETL_MODEL_OUTPUT_SHAPE;\n"
        "size_t model_size(void);\n"
        "size_t model_size(void) {\n"
        "  return sizeof(edgetl_model_onnx) + edgetl_model_onnx_len + (size_t)(in_shape[3] * out_shape[1]\n"
        "         * EDGETL_MODEL_NUM_CLASSES) + ((size_t)edgetl_model_onnx % 16u);\n}\n"
    )
    (tmp_path / "use.c").write_text(use)
    (tmp_path / "use.cpp").write_text(use)
    subprocess.run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-c", "use.c"], cwd=tmp_path, check=True,
                   capture_output=True)
    if shutil.which("c++"):
        subprocess.run(["c++", "-std=c++11", "-Wall", "-Werror", "-c", "use.cpp"], cwd=tmp_path, check=True,
                       capture_output=True)
    body = text.split("edgetl_model_onnx[] = {", 1)[1].split("};", 1)[0]
    assert bytes.fromhex("".join(body.split()).replace("0x", "").replace(",", "")) == conv_onnx.read_bytes()


@pytest.mark.parametrize("size", [1, 15, 16, 17, 33])
def test_c_array_body_round_trips(size):
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    body = bundle.c_array_body(data)
    lines = body.split("\n")
    assert all(line.startswith("  0x") and line.endswith(",") for line in lines)
    assert all(len(line) == 2 + 5 * 16 for line in lines[:-1])
    assert bytes(int(t, 16) for t in "".join(body.split()).rstrip(",").split(",")) == data


def test_verify_files_and_publish(tmp_path):
    out = tmp_path / "art"
    with bundle.staging_dir(out) as stage:
        (stage / bundle.MODEL_FILE).write_bytes(b"onnx")
        bundle.write_labels(stage, ["a", "b"])
        (stage / bundle.PREPROCESS_FILE).write_text("{}")
        bundle.write_manifest(stage, {"format": bundle.ARTIFACT_FORMAT})
        bundle.publish(stage, out, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    manifest = bundle.verify_files(out)
    assert set(manifest["files"]) == {"model.onnx", "labels.json", "preprocess.json"}
    (out / bundle.VALIDATION_FILE).write_text("{}")  # not part of the hashed set
    bundle.verify_files(out)
    (out / bundle.LABELS_FILE).write_text(json.dumps(["a", "c"]))
    with pytest.raises(ArtifactError, match=r"sha256 mismatch for labels\.json"):
        bundle.verify_files(out)
    (out / bundle.LABELS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"missing file labels\.json"):
        bundle.verify_files(out)


def test_stratified_sample_balances_classes():
    records = [(f"a{i}", 0) for i in range(50)] + [(f"b{i}", 1) for i in range(5)] + [(f"c{i}", 2) for i in range(50)]
    sample = stratified_sample(records, 20, seed=1)
    counts = [sum(1 for _, y in sample if y == k) for k in range(3)]
    assert len(sample) == 20 and counts[1] == 5 and abs(counts[0] - counts[2]) <= 1
    assert stratified_sample(records, 20, seed=1) == sample and len(set(sample)) == 20
