import importlib.util
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgetl.cli import cli
from edgetl.errors import BackendUnavailableError, ConfigError, EdgetlError, ExportError
from edgetl.runtime import make_runner
from edgetl.runtime.bench import (
    BenchResult,
    benchmark,
    benchmark_interleaved,
    onnx_input_shape,
    peak_rss_mb,
)
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner, resolve_providers
from edgetl.runtime.torch import TorchRunner
from edgetl.zoo.onnx_io import export_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "tiny.onnx"
    export_onnx(_tiny(), path, resolution=32, exporter="torchscript")
    return path


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "static.onnx"
    export_onnx(_tiny(), path, resolution=24, batch=2, dynamic_batch=False, exporter="torchscript")
    return path


# --- runners ------------------------------------------------------------------------------------


def test_onnxruntime_runner_matches_torch(tiny_onnx):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = _tiny()(torch.from_numpy(x)).numpy()
    with OnnxRuntimeRunner(tiny_onnx, providers="cpu", threads=1) as runner:
        got = runner.infer({"input": x})
        assert list(got) == ["logits"]
        np.testing.assert_allclose(got["logits"], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(runner.infer(x)["logits"], want, atol=1e-4, rtol=0)  # bare array
        assert runner.active_providers == ["CPUExecutionProvider"]
    with TorchRunner(_tiny(), device="cpu") as runner:
        np.testing.assert_allclose(runner.infer(x)["logits"], want, atol=1e-6, rtol=0)


def test_runner_records_its_inference_times(tiny_onnx):
    runner = OnnxRuntimeRunner(tiny_onnx, providers="cpu")
    assert runner.last_inference_time() is None
    with runner:
        for _ in range(4):
            runner.infer(np.zeros((1, 3, 32, 32), np.float32))
    assert len(runner.inference_times) == 4
    assert all(t > 0 for t in runner.inference_times)
    assert runner.last_inference_time() == runner.inference_times[-1]
    runner.reset_times()
    assert runner.inference_times == [] and runner.last_inference_time() is None


def test_dynamic_batch_exported_at_one_runs_at_three(tiny_onnx):
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with OnnxRuntimeRunner(tiny_onnx) as runner:
        spec = runner.input_specs()[0]
        assert spec.name == "input" and spec.shape == ("batch", 3, 32, 32) and spec.is_dynamic(0)
        out = runner.infer(x)["logits"]
    assert out.shape == (3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(out, _tiny()(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)


def test_lazy_load_and_deactivate(tiny_onnx):
    runner = OnnxRuntimeRunner(tiny_onnx)
    assert runner.session is None and not runner.is_active
    with pytest.raises(EdgetlError, match="not active"):
        runner.infer(np.zeros((1, 3, 32, 32), np.float32))
    with runner as active:
        assert active is runner and runner.is_active and runner.session is not None
    assert not runner.is_active and runner.session is None


def test_feed_is_checked_against_the_model(tiny_onnx, static_onnx):
    with OnnxRuntimeRunner(tiny_onnx) as runner:
        with pytest.raises(ConfigError, match="axis 1"):
            runner.infer(np.zeros((1, 4, 32, 32), np.float32))
        with pytest.raises(ConfigError, match="4 dimensions"):
            runner.infer(np.zeros((3, 32, 32), np.float32))
        with pytest.raises(ConfigError, match="do not match"):
            runner.infer({"image": np.zeros((1, 3, 32, 32), np.float32)})
        with pytest.raises(ConfigError, match="must be float32"):
            runner.infer(np.zeros((1, 3, 32, 32), np.int64))
        as_float64 = runner.infer(np.ones((1, 3, 32, 32), np.float64))["logits"]
        np.testing.assert_allclose(as_float64, runner.infer(np.ones((1, 3, 32, 32), np.float32))["logits"])
    with OnnxRuntimeRunner(static_onnx) as runner:
        with pytest.raises(ConfigError, match="fixed size 2 on axis 0"):
            runner.infer(np.zeros((3, 3, 24, 24), np.float32))
        assert runner.infer(np.zeros((2, 3, 24, 24), np.float32))["logits"].shape == (2, 4)


def test_onnxruntime_runner_from_bytes_and_options(tiny_onnx):
    data = tiny_onnx.read_bytes()
    with OnnxRuntimeRunner(data, graph_optimization_level="disable", threads=2) as runner:
        assert runner.infer(np.zeros((1, 3, 32, 32), np.float32))["logits"].shape == (1, 4)
    with pytest.raises(ConfigError, match="optimization level"):
        OnnxRuntimeRunner(tiny_onnx, graph_optimization_level="max")
    with pytest.raises(ConfigError, match="threads"):
        OnnxRuntimeRunner(tiny_onnx, threads=0)
    with pytest.raises(ConfigError, match="does not exist"):
        OnnxRuntimeRunner(tiny_onnx.parent / "missing.onnx")
    with pytest.raises(ExportError, match="cannot load"):
        OnnxRuntimeRunner(b"not an onnx model").activate()


# Ids that are not marker names: conftest skips any test with "tensorrt" among its keywords.
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"], ids=["ort-cuda-ep", "ort-trt-ep"])
def test_unavailable_provider_says_what_to_install(tiny_onnx, provider):
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if wanted in ort.get_available_providers():
        pytest.skip(f"{wanted} is installed here")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        OnnxRuntimeRunner(tiny_onnx, providers=provider)
    with pytest.raises(BackendUnavailableError, match=wanted):
        resolve_providers([wanted, "CPUExecutionProvider"])


def test_provider_names():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider"):
        resolve_providers("gpu")


def test_torch_runner_restores_mode_and_threads():
    model = _tiny().train()
    threads = torch.get_num_threads()
    runner = TorchRunner(model, device="cpu", threads=1)
    with runner:
        assert not model.training and torch.get_num_threads() == 1
        out = runner.infer(np.zeros((2, 3, 16, 16), np.float32))
        assert out["logits"].shape == (2, 4)
    assert model.training and torch.get_num_threads() == threads


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_torch_runner_without_cuda():
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        TorchRunner(_tiny(), device="cuda")
    assert TorchRunner(_tiny()).device.type == "cpu"  # auto


def test_torch_runner_named_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    with TorchRunner(Pair(), device="cpu") as runner:
        out = runner.infer(np.ones((1, 3, 4, 4), np.float32))
    assert list(out) == ["logits", "output_1"]


def test_make_runner(tiny_onnx):
    assert isinstance(make_runner("onnxruntime", tiny_onnx, threads=1), OnnxRuntimeRunner)
    assert isinstance(make_runner("torch", _tiny(), device="cpu"), TorchRunner)
    with pytest.raises(ConfigError, match="not files"):
        make_runner("torch", tiny_onnx)
    with pytest.raises(ConfigError, match="needs an ONNX file"):
        make_runner("onnxruntime", _tiny())
    with pytest.raises(ConfigError, match="unknown runtime"):
        make_runner("openvino", tiny_onnx)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_runner_without_tensorrt(tiny_onnx):
    from edgetl.runtime.tensorrt import TensorRTRunner, build_engine, tensorrt_available

    assert not tensorrt_available()
    with pytest.raises(BackendUnavailableError, match=r'pip install "edgetl\[tensorrt\]"'):
        TensorRTRunner(tiny_onnx)
    with pytest.raises(BackendUnavailableError, match="Jetson"):
        make_runner("tensorrt", tiny_onnx, precision="fp16")
    with pytest.raises(BackendUnavailableError):
        build_engine(tiny_onnx, precision="fp32")
    with pytest.raises(ConfigError, match="precision"):
        TensorRTRunner(tiny_onnx, precision="int4")


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision,atol", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_engine_build_and_run(tiny_onnx, tmp_path, precision, atol):
    from edgetl.runtime.tensorrt import TensorRTRunner

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with OnnxRuntimeRunner(tiny_onnx, providers="cpu") as reference:
        want = reference.infer(x)["logits"]
    engine = tmp_path / "tiny.engine"
    with TensorRTRunner(tiny_onnx, precision=precision, max_batch=4, engine_path=engine) as runner:
        np.testing.assert_allclose(runner.infer(x)["logits"], want, atol=atol, rtol=0)
        assert runner.infer(x[:1])["logits"].shape == (1, 4)
        with pytest.raises(ConfigError, match="max_batch"):
            runner.infer(np.zeros((5, 3, 32, 32), np.float32))
    assert engine.stat().st_size > 0
    with TensorRTRunner(engine) as runner:  # the saved engine loads without rebuilding
        np.testing.assert_allclose(runner.infer(x)["logits"], want, atol=atol, rtol=0)
        result = benchmark(runner, shape=(2, 3, 32, 32), iterations=5, warmup=2)
    assert result.backend == "tensorrt" and result.min <= result.p50 <= result.max


@pytest.mark.tensorrt
def test_tensorrt_int8_needs_a_qdq_model(tiny_onnx):
    from edgetl.runtime.tensorrt import build_engine

    with pytest.raises(ExportError, match="QuantizeLinear"):
        build_engine(tiny_onnx, precision="int8")


# --- benchmarking -------------------------------------------------------------------------------


def test_benchmark_statistics_are_consistent(tiny_onnx):
    runner = OnnxRuntimeRunner(tiny_onnx, threads=1, name="tiny")
    result = benchmark(runner, shape=(2, 3, 32, 32), iterations=25, warmup=3)
    assert not runner.is_active  # activated for the run, then released
    assert len(runner.inference_times) == 28
    assert result.name == "tiny" and result.backend == "onnxruntime"
    assert result.iterations == 25 and result.warmup == 3 and len(result.times_ms) == 25
    assert result.shape == (2, 3, 32, 32) and result.batch == 2
    assert 0 < result.min <= result.p50 <= result.p90 <= result.p99 <= result.max
    assert result.min <= result.mean <= result.max
    assert result.std >= 0 and result.cv >= 0
    assert result.cv == pytest.approx(result.std / result.mean)
    assert result.throughput == pytest.approx(2 / (result.mean / 1e3))
    assert result.unstable == (result.cv > 0.1)
    assert result.min <= result.percentile(10) <= result.p50
    assert result.peak_rss_mb > 0
    np.testing.assert_allclose(sorted(result.times_ms), sorted(1e3 * t for t in runner.inference_times[3:]))
    d = result.to_dict()
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "cv", "throughput",
                "peak_rss_mb", "iterations", "warmup", "unstable"):
        assert key in d
    json.dumps(result.to_dict(include_times=True))


def test_bench_result_from_known_times(caplog):
    steady = BenchResult.from_times([0.010] * 5, name="steady", shape=(4, 3, 8, 8))
    assert steady.p50 == pytest.approx(10.0) and steady.cv == 0 and not steady.unstable
    assert steady.throughput == pytest.approx(400.0)

    noisy = BenchResult.from_times([0.001, 0.002, 0.003, 0.004], name="noisy")
    assert noisy.p50 == pytest.approx(2.5) and noisy.mean == pytest.approx(2.5)
    assert noisy.min == pytest.approx(1.0) and noisy.max == pytest.approx(4.0)
    assert noisy.std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert noisy.unstable
    with pytest.raises(ConfigError):
        BenchResult.from_times([])
    with pytest.raises(ConfigError):
        noisy.percentile(101)


def test_unstable_benchmark_warns(tiny_onnx, caplog):
    class Jittery(OnnxRuntimeRunner):
        """A real ORT runner whose every other inference also sleeps: a busy machine, on purpose."""

        calls = 0

        def infer_impl(self, feed):
            Jittery.calls += 1
            if Jittery.calls % 2:
                import time

                time.sleep(0.004)
            return super().infer_impl(feed)

    with caplog.at_level(logging.WARNING, logger="edgetl.runtime.bench"):
        result = benchmark(Jittery(tiny_onnx, name="jittery"), shape=(1, 3, 32, 32), iterations=10, warmup=0)
    assert result.unstable and result.cv > 0.1
    assert any("unstable" in r.message and "jittery" in r.message for r in caplog.records)


def test_benchmark_arguments(tiny_onnx):
    runner = OnnxRuntimeRunner(tiny_onnx)
    with pytest.raises(ConfigError, match="iterations"):
        benchmark(runner, iterations=0)
    with pytest.raises(ConfigError, match="warmup"):
        benchmark(runner, warmup=-1)
    feed = np.zeros((3, 3, 32, 32), np.float32)
    assert benchmark(runner, feed=feed, iterations=2, warmup=0).shape == (3, 3, 32, 32)


def test_benchmark_interleaved_runs_every_model_alike(tiny_onnx, static_onnx):
    runners = {
        "dynamic": OnnxRuntimeRunner(tiny_onnx, threads=1),
        "static": OnnxRuntimeRunner(static_onnx, threads=1),
        "torch": TorchRunner(_tiny(), device="cpu", threads=1),
    }
    shapes = {"dynamic": (1, 3, 32, 32), "static": (2, 3, 24, 24), "torch": (1, 3, 32, 32)}
    results = benchmark_interleaved(runners, shapes, rounds=6, iterations_per_round=2, warmup=1)
    assert list(results) == ["dynamic", "static", "torch"]
    for label, result in results.items():
        assert result.name == label and result.iterations == 12 and result.warmup == 1
        assert result.shape == shapes[label]
        assert result.min <= result.p50 <= result.p90 <= result.p99 <= result.max
        assert len(runners[label].inference_times) == 13
        assert not runners[label].is_active
    assert results["torch"].backend == "torch"
    assert results["static"].batch == 2
    rotated = benchmark_interleaved({"a": runners["dynamic"]}, (1, 3, 32, 32), rounds=3, shuffle=False, warmup=0)
    assert rotated["a"].iterations == 3
    before = len(runners["static"].inference_times)
    settled = benchmark_interleaved(runners, shapes, rounds=2, iterations_per_round=2, warmup=0, settle=1)
    assert settled["static"].iterations == 4  # the settle runs are not timed
    assert len(runners["static"].inference_times) - before == 6
    with pytest.raises(ConfigError, match="no input shape"):
        benchmark_interleaved(runners, {"dynamic": (1, 3, 32, 32)}, rounds=1)
    with pytest.raises(ConfigError):
        benchmark_interleaved({}, rounds=1)


def test_peak_rss_is_positive():
    assert peak_rss_mb() > 10


def test_onnx_input_shape(tiny_onnx, static_onnx, tmp_path):
    assert onnx_input_shape(tiny_onnx) == (1, 3, 32, 32)
    assert onnx_input_shape(tiny_onnx, batch=4, resolution=32) == (4, 3, 32, 32)
    assert onnx_input_shape(static_onnx) == (2, 3, 24, 24)
    with pytest.raises(ConfigError, match="fixed batch of 2"):
        onnx_input_shape(static_onnx, batch=1)
    with pytest.raises(ConfigError, match="takes 32x32"):
        onnx_input_shape(tiny_onnx, resolution=64)
    model = onnx.load(str(tiny_onnx))
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "size"
    free = tmp_path / "free.onnx"
    onnx.save(model, str(free))
    with pytest.raises(ConfigError, match="--resolution"):
        onnx_input_shape(free)
    assert onnx_input_shape(free, resolution=40) == (1, 3, 40, 40)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        onnx_input_shape(tmp_path / "junk.onnx")


# --- CLI ----------------------------------------------------------------------------------------

BENCH_KEYS = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "throughput", "peak_rss_mb", "cv",
              "unstable", "iterations", "warmup", "shape", "runtime", "model"}


def test_cli_bench_onnx_file_json(tiny_onnx):
    result = CliRunner().invoke(cli, ["bench", str(tiny_onnx), "--iterations", "5", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) >= BENCH_KEYS
    assert doc["iterations"] == 5 and doc["shape"] == [1, 3, 32, 32] and doc["runtime"] == "onnxruntime"
    assert doc["min_ms"] <= doc["p50_ms"] <= doc["p90_ms"] <= doc["p99_ms"] <= doc["max_ms"]


def test_cli_bench_table_and_options(tiny_onnx):
    result = CliRunner().invoke(
        cli, ["bench", str(tiny_onnx), "--iterations", "3", "--warmup", "0", "--batch", "2", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    for word in ("p50 ms", "p99 ms", "throughput", "peak RSS", "CV", "2x3x32x32"):
        assert word in result.stdout


def test_cli_bench_errors(tiny_onnx, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", str(tiny_onnx), "--runtime", "torch"])
    assert result.exit_code == 1 and "--runtime torch" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(cli, ["bench", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = runner.invoke(cli, ["bench", str(tiny_onnx), "--resolution", "64"])
    assert result.exit_code == 1 and "takes 32x32" in result.stderr
    result = runner.invoke(cli, ["bench", str(tiny_onnx), "--iterations", "0"])
    assert result.exit_code == 1 and "iterations" in result.stderr


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_cli_bench_tensorrt_unavailable(tiny_onnx):
    result = CliRunner().invoke(cli, ["bench", str(tiny_onnx), "--runtime", "tensorrt"])
    assert result.exit_code == 1 and "edgetl[tensorrt]" in result.stderr


@pytest.mark.slow
def test_cli_bench_catalog_model():
    runner = CliRunner()
    args = ["bench", "mobilenet_v3_small", "--resolution", "32", "--iterations", "3", "--warmup", "1", "--json"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) >= BENCH_KEYS
    assert doc["model"] == "mobilenet_v3_small" and doc["source"] == "catalog"
    assert doc["shape"] == [1, 3, 32, 32]
    assert doc["onnx"]["nodes"] <= doc["onnx"]["nodes_exported"]
    torch_doc = json.loads(runner.invoke(cli, [*args, "--runtime", "torch"]).stdout)
    assert torch_doc["runtime"] == "torch" and torch_doc["iterations"] == 3
    result = runner.invoke(cli, ["bench", "resnet19"])
    assert result.exit_code == 1 and "did you mean" in result.stderr
