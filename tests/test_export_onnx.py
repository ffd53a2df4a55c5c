import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision import models as tvm

from edgetl.errors import ConfigError, ExportError
from edgetl.export.onnx import check_parity
from edgetl.zoo import onnx_cache
from edgetl.zoo.onnx_io import export_onnx


class TinyNet(nn.Module):
    """Three conv layers and a linear head: every part of the export pipeline in a few kB."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class CumMax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=1)[0]


class WithUnsupportedOp(nn.Module):
    """aten::cummax has no ONNX translation in either exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), CumMax())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is really tested
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = _tiny()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(model, path, resolution=32, exporter="torchscript")
    return model, path, report


def test_export_writes_a_checked_model_with_the_edgetl_convention(tiny_export):
    _, path, report = tiny_export
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {e.version for e in model.opset_import if e.domain in ("", "ai.onnx")} == {17}
    assert report.opset == 17
    assert report.exporter == "torchscript"
    assert report.input_shapes == {"input": ["batch", 3, 32, 32]}
    assert report.output_shapes == {"logits": ["batch", 5]}
    assert report.dynamic_batch is True
    assert report.simplified is True
    assert report.nodes_after == len(model.graph.node) == sum(report.op_counts.values())
    assert report.nodes_after <= report.nodes_before
    assert "BatchNormalization" not in report.op_counts  # folded into the convolution
    assert report.file_bytes == path.stat().st_size
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert report.to_dict()["path"] == str(path)


def test_exported_model_matches_torch_and_runs_any_batch(tiny_export):
    model, path, _ = tiny_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_parity_report_passes_then_fails_when_the_model_changes(tiny_export, tmp_path):
    model, path, _ = tiny_export
    x = torch.randn(6, 3, 32, 32)
    report = check_parity(model, path, x)
    assert report.passed and report.samples == 6
    assert report.top1_agreement == 1.0
    assert 0 <= report.mean_abs_diff <= report.max_abs_diff < 1e-4

    changed = _tiny()
    with torch.no_grad():
        changed.head.bias.add_(1.0)
        changed.head.bias[0].add_(5.0)
    bad = check_parity(changed, path, x, atol=1e-4)
    assert not bad.passed
    assert bad.max_abs_diff > 1.0
    assert bad.top1_agreement < 1.0
    assert bad.to_dict()["passed"] is False


def test_static_batch_export(tmp_path):
    report = export_onnx(_tiny(), tmp_path / "static.onnx", resolution=(32, 48), batch=2,
                         dynamic_batch=False, exporter="torchscript")
    assert report.input_shapes == {"input": [2, 3, 32, 48]}
    assert report.dynamic_batch is False
    parity = check_parity(_tiny(), report.path, torch.randn(4, 3, 32, 48))  # fed in chunks of 2
    assert parity.passed


def test_failed_export_names_the_op_and_module_and_leaves_no_file(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(WithUnsupportedOp(), target, resolution=16, exporter="torchscript")
    msg = str(info.value)
    assert "aten::cummax" in msg
    assert "'block.1' (CumMax)" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file


def test_failed_export_keeps_an_existing_file_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")
    with pytest.raises(ExportError):
        export_onnx(WithUnsupportedOp(), target, resolution=16, exporter="torchscript")
    assert target.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_model_failing_on_the_input_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="fails on a \\[1, 3, 32, 32\\] input"):
        export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), tmp_path / "m.onnx", resolution=32)
    assert not (tmp_path / "m.onnx").exists()


def test_model_returning_a_tuple_is_refused(tmp_path):
    class Two(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    with pytest.raises(ExportError, match="one logits tensor"):
        export_onnx(Two(), tmp_path / "m.onnx", resolution=8)


def test_hard_coded_batch_is_caught_by_the_dynamic_batch_check(tmp_path):
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).reshape(int(x.shape[0]), -1)  # the tracer bakes the example batch in

    with pytest.raises(ExportError, match="batch"):
        export_onnx(FixedBatch(), tmp_path / "m.onnx", resolution=8, exporter="torchscript")
    assert not (tmp_path / "m.onnx").exists()
    report = export_onnx(FixedBatch(), tmp_path / "m.onnx", resolution=8, dynamic_batch=False,
                         exporter="torchscript")
    assert report.input_shapes["input"][0] == 1


def test_training_mode_is_restored(tmp_path):
    model = _tiny().train()
    export_onnx(model, tmp_path / "m.onnx", resolution=16, exporter="torchscript")
    assert model.training


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(_tiny(), tmp_path / "m.onnx", opset=3)
    with pytest.raises(ConfigError, match="exporter"):
        export_onnx(_tiny(), tmp_path / "m.onnx", exporter="magic")
    with pytest.raises(ConfigError, match="batch"):
        export_onnx(_tiny(), tmp_path / "m.onnx", batch=0)
    with torch.device("meta"):
        meta = TinyNet()
    with pytest.raises(ExportError, match="meta"):
        export_onnx(meta, tmp_path / "m.onnx", resolution=16)
    assert list(tmp_path.iterdir()) == []


def test_onnxslim_failure_keeps_the_exported_graph(tmp_path, monkeypatch, caplog):
    import onnxslim

    def broken(model, *args, **kwargs):
        raise RuntimeError("pattern matcher exploded")

    monkeypatch.setattr(onnxslim, "slim", broken)
    with caplog.at_level(logging.WARNING, logger="edgetl.zoo.onnx_io"):
        report = export_onnx(_tiny(), tmp_path / "m.onnx", resolution=16, exporter="torchscript")
    assert not report.simplified
    assert "exploded" in report.simplify_error
    assert report.nodes_after == report.nodes_before
    assert any("unsimplified" in r.message for r in caplog.records)
    assert check_parity(_tiny(), report.path, torch.randn(2, 3, 16, 16)).passed


def test_onnxslim_result_that_changes_the_outputs_is_rejected(tmp_path, monkeypatch):
    import onnxslim

    real = onnxslim.slim

    def renaming(model, *args, **kwargs):
        slim = real(model, *args, **kwargs)
        slim.graph.output[0].name = "renamed"
        for node in slim.graph.node:
            node.output[:] = ["renamed" if o == "logits" else o for o in node.output]
        return slim

    monkeypatch.setattr(onnxslim, "slim", renaming)
    report = export_onnx(_tiny(), tmp_path / "m.onnx", resolution=16, exporter="torchscript")
    assert not report.simplified and "inputs or outputs" in report.simplify_error
    assert report.output_names == ("logits",)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_models_export_with_parity(arch, tmp_path):
    torch.manual_seed(0)
    model = tvm.get_model(arch, weights=None).eval()
    report = export_onnx(model, tmp_path / f"{arch}.onnx", resolution=32)
    assert report.exporter == "torchscript" and report.dynamic_batch
    assert report.nodes_after < report.nodes_before  # onnxslim removes the exporter's shape arithmetic
    parity = check_parity(model, report.path, torch.randn(3, 3, 32, 32), atol=1e-4)
    assert parity.passed, parity
    assert parity.top1_agreement == 1.0


@pytest.mark.slow
def test_dynamo_exporter_keeps_a_batch_of_one_dynamic(tmp_path):
    report = export_onnx(_tiny(), tmp_path / "d.onnx", resolution=16, batch=1, exporter="dynamo")
    assert report.exporter == "dynamo"
    assert report.input_shapes["input"][0] == "batch"
    assert check_parity(_tiny(), report.path, torch.randn(3, 3, 16, 16)).passed


@pytest.mark.slow
def test_auto_falls_back_to_dynamo_for_ops_torchscript_lacks(tmp_path):
    class Spectrum(nn.Module):  # aten::fft_fft2: dynamo translates it, TorchScript does not
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.fft.fft2(self.conv(x)).abs().mean((2, 3))

    model = Spectrum().eval()
    with pytest.raises(ExportError, match="fft_fft2"):
        export_onnx(model, tmp_path / "ts.onnx", resolution=16, exporter="torchscript")
    report = export_onnx(model, tmp_path / "auto.onnx", resolution=16)
    assert report.exporter == "dynamo"
    assert check_parity(model, report.path, torch.randn(2, 3, 16, 16), atol=1e-4).passed


@pytest.mark.slow
def test_catalog_export_is_reproducible_and_cached(tmp_path):
    first = onnx_cache.export_catalog_model("mobilenet_v3_small", tmp_path / "a.onnx", resolution=32)
    assert first.input_shapes == {"input": ["batch", 3, 32, 32]}
    assert first.output_shapes == {"logits": ["batch", 1000]}

    cached = onnx_cache.cached_catalog_onnx("mobilenet_v3_small", resolution=32)
    assert cached.path.parent.name == "onnx" and cached.nodes_after == first.nodes_after
    assert cached.path.read_bytes() == (tmp_path / "a.onnx").read_bytes()  # seeded random init
    stamp = cached.path.stat().st_mtime_ns
    again = onnx_cache.cached_catalog_onnx("mobilenet_v3_small", resolution=32)
    assert again == cached and again.path.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="at least"):
        onnx_cache.export_catalog_model("mobilenet_v3_small", tmp_path / "c.onnx", resolution=0)
