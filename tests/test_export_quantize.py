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
from edgetl.export import bundle
from edgetl.export.accuracy_control import control_accuracy, relative_error, smallest_passing
from edgetl.export.evaluate import stratified_sample
from edgetl.zoo import quantize
from edgetl.zoo.onnx_io import export_onnx


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


class OutlierNet(nn.Module):
    """A network plain INT8 breaks: ``mid`` has, in every output channel, one weight of 1000 on an input
    channel that ReLU always zeroes (FP32 ignores it), so its per-channel int8 scale rounds every other
    weight to zero. Keeping that one layer in float restores the network."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.top = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 10)
        with torch.no_grad():
            self.stem.weight[0].clamp_(-1e-3, 1e-3)
            self.stem.bias[0] = -1.0  # channel 0 is dead after the ReLU (a zero weight would be degenerate)
            self.mid.weight[:, 0, 1, 1] = 1e3
            self.head.weight.mul_(30)  # logits that depend on the image more than on the bias
            self.head.bias.zero_()

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.head(self.top(x).mean((2, 3)))


def _images(rng, n):
    """Noise around a colour of its own per image, so that the classes of a random network vary."""
    return (rng.standard_normal((n, 3, 32, 32)) + 3 * rng.standard_normal((n, 3, 1, 1))).astype(np.float32)


def _logits(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x})[0] for x in images])


def test_accuracy_control_keeps_only_the_outlier_layer_in_float(tmp_path):
    torch.manual_seed(0)
    fp32 = tmp_path / "outlier.onnx"
    export_onnx(OutlierNet().eval(), fp32, resolution=32)
    rng = np.random.default_rng(0)
    calib = [_images(rng, 8) for _ in range(2)]
    checks = [_images(rng, 16) for _ in range(2)]
    cache = tmp_path / "ranges.json"
    plain = quantize.quantize_int8_static(fp32, tmp_path / "int8.onnx", calib, calibration_cache=cache)
    ref = _logits(fp32, checks)

    def agreement(path):
        return float(np.mean(_logits(path, checks).argmax(1) == ref.argmax(1)))

    assert agreement(plain.path) < 0.9 and cache.is_file()  # plain INT8 is far over a 1-point budget

    def requantized(kept):
        return quantize.quantize_int8_static(fp32, tmp_path / "try.onnx", [], keep_float=kept,
                                             calibration_cache=cache).path  # ranges from the cache

    layers = quantize.quantized_layers(plain.path)
    assert len(layers) == 4
    calib_ref = _logits(fp32, calib)
    result = control_accuracy(layers, lambda kept: relative_error(_logits(requantized(kept), calib), calib_ref),
                              lambda kept: agreement(requantized(kept)) >= 0.99)
    assert result.passed and len(result.kept_in_float) == 1 and result.trials == 1
    mid = result.kept_in_float[0]
    assert result.sensitivity[0]["layer"] == mid and result.sensitivity[0]["error"] < 0.01
    mixed = quantize.quantize_int8_static(fp32, tmp_path / "mixed.onnx", [], keep_float=[mid],
                                          calibration_cache=cache)
    assert mixed.kept_in_float == [mid] and quantize.quantized_layers(mixed.path) == [n for n in layers if n != mid]
    assert agreement(mixed.path) >= 0.99


def test_the_search_finds_the_fewest_sensitive_layers():
    ranked = [f"l{i}" for i in range(10)]
    calls = []

    def passes(kept):
        calls.append(len(kept))
        return len(kept) >= 5

    kept, trials = smallest_passing(ranked, passes, limit=8)
    assert kept == ranked[:5] and trials == len(calls) and calls[:4] == [1, 2, 4, 8]
    assert smallest_passing(ranked, lambda kept: False, limit=3) == (None, 3)  # 1, 2, 3: then give up


def _candidate(precision: str, predicted_ms: float | None = None, min_ms: float = 0.0, p25_ms: float = 0.0,
               drop_pts: float = 0.0):
    from pathlib import Path

    from edgetl.export.api import _Candidate

    return _Candidate(precision, Path(f"{precision}.onnx"), "static", predicted_ms=predicted_ms,
                      latency={"min_ms": min_ms, "p25_ms": p25_ms}, accuracy={"drop_pts": drop_pts})


def test_auto_precision_says_what_decided_each_candidate():
    from edgetl.export.api import SPEED_MARGIN, _choose

    assert SPEED_MARGIN == 0.10  # the figures below are on either side of it
    fp32, fp16, int8 = _candidate("fp32", 1.514), _candidate("fp16", 1.45), _candidate("int8", 1.514)
    assert _choose([fp32, fp16, int8], "predicted", max_drop=1.0) is fp32 and fp32.chosen and fp32.note is None
    assert fp16.note == "not faster than fp32 by the required 10% (predicted 1.450 vs 1.514 ms)"
    assert int8.note == "not faster than fp32 by the required 10% (predicted 1.514 vs 1.514 ms)"  # equal: not slower

    fp32, int8 = _candidate("fp32", 1.0), _candidate("int8", 1.2)
    _choose([fp32, int8], "predicted", max_drop=1.0)
    assert int8.note == "slower than fp32 (predicted 1.200 vs 1.000 ms)"

    fp32, int8 = _candidate("fp32", 2.0), _candidate("int8", 1.0)
    assert _choose([fp32, int8], "predicted", max_drop=1.0) is int8
    assert fp32.note == "int8 is at least 10% faster (predicted 1.000 vs 2.000 ms)" and int8.note is None

    # measured: the minimum is faster by the margin, the 25th percentile is not
    fp32, int8 = _candidate("fp32", min_ms=2.0, p25_ms=2.2), _candidate("int8", min_ms=1.5, p25_ms=2.1)
    assert _choose([fp32, int8], "measured", max_drop=1.0) is fp32
    assert int8.note == ("not faster than fp32 by the required 10% on both min and p25 "
                         "(measured here min 1.500 vs 2.000 ms, p25 2.100 vs 2.200 ms)")

    # out of the accuracy budget: the rejection says why, and nothing compares it
    fp32, int8 = _candidate("fp32", 2.0), _candidate("int8", 1.0, drop_pts=3.0)
    assert _choose([fp32, int8], "predicted", max_drop=1.0) is fp32
    assert int8.rejected == "accuracy drop 3.00 pts > budget 1 pts" and int8.note is None
