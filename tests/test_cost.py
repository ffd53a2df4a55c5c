import json

import pytest
import torch

from edgetl.zoo import catalog, cost, model_cost


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16"])
def test_flops_and_params_match_torchvision(name):
    card = catalog.get_card(name)
    trace = model_cost.trace_model(card)
    assert trace.params == card.params
    # torchvision's "GFLOPS" are multiply-accumulates; the trace counts 2 FLOPs per MAC
    assert trace.flops / 2e9 == pytest.approx(card.gflops, rel=0.03)


def test_resnet18_fusion():
    trace = model_cost.trace_model("resnet18")
    unfused = [o for o in trace.ops if not o.fused]
    assert all(o.fused for o in trace.ops if o.cls == "norm")  # BatchNorm folded into the conv
    assert all(o.fused for o in trace.ops if o.cls == "elementwise")  # ReLU and residual adds fused
    classes = [o.cls for o in unfused]
    assert classes.count("conv") == 20
    assert classes.count("matmul") == 1
    assert trace.kernels == 23  # 20 convs, max pool, global mean, fc


def test_squeeze_excitation_multiply_is_not_fused():
    trace = model_cost.trace_model("efficientnet_b0")
    se_muls = [o for o in trace.ops if o.op == "mul" and not o.fused]
    assert len(se_muls) == 16
    assert any(o.cls == "depthwise" for o in trace.ops)


def test_vit_attention_and_layernorm():
    trace = model_cost.trace_model("vit_b_16")
    by = trace.by_class()
    assert by["attention"]["flops"] > 0
    assert by["matmul"]["flops"] > 10 * by["attention"]["flops"]
    assert by["norm"]["kernels"] == 25  # LayerNorm is not folded


def test_peak_activation_is_between_largest_tensor_and_total():
    trace = model_cost.trace_model("resnet18")
    largest = max(o.act_out for o in trace.ops)
    total = sum(o.act_out for o in trace.ops) + trace.input_elements
    assert largest <= trace.peak_activation < total


def test_trace_module_on_a_custom_model():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )
    trace = cost.trace_module(net, 16)
    kinds = [(o.cls, o.fused) for o in trace.ops]
    assert ("conv", False) in kinds and ("depthwise", False) in kinds
    conv = next(o for o in trace.ops if o.cls == "conv")
    assert conv.flops == 2 * 3 * 8 * 9 * 16 * 16
    assert conv.weight == 8 * 3 * 9 + 8
    assert conv.act_in == 3 * 16 * 16 and conv.act_out == 8 * 16 * 16
    lin = next(o for o in trace.ops if o.cls == "matmul")
    assert lin.flops == 2 * 8 * 4
    assert trace.kernels == 4


def test_trace_is_cached_on_disk_keyed_by_model_resolution_and_torch(tmp_path):
    trace = model_cost.trace_model("mobilenet_v3_small", 96)
    path = cost._cache_path("mobilenet_v3_small", 96)
    assert path.exists()
    assert f"torch-{torch.__version__.split('+')[0]}" in str(path.parent) or "torch-" in str(path.parent)
    data = json.loads(path.read_text())
    assert data["resolution"] == 96 and data["model"] == "mobilenet_v3_small"
    again = cost.cached_trace("mobilenet_v3_small", 96)
    assert again.to_dict() == trace.to_dict()


def test_untraceable_resolution_gives_reason():
    with pytest.raises(cost.TraceError, match="alexnet at 16px"):
        model_cost.trace_model("alexnet", 16)


@pytest.mark.slow
def test_every_catalog_model_traces_at_its_own_resolution():
    failed = []
    for card in catalog.list_models():
        try:
            trace = model_cost.trace_model(card)
        except cost.TraceError as exc:
            failed.append(str(exc))
            continue
        if card.name in ("googlenet", "inception_v3"):
            # torchvision's num_params counts the auxiliary heads, which inference drops
            assert trace.params <= card.params, card.id
        else:
            assert trace.params == card.params, card.id
        assert trace.kernels > 0
    assert not failed, failed


class _Copies(torch.nn.Module):
    """A channels-last layer norm, a transpose a reshape makes contiguous, a matrix product reading a transposed
    tensor, half a tensor sliced off and a broadcast: views in torch, copies in ONNX Runtime where they move data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.norm = torch.nn.LayerNorm(16)
        self.mix = torch.nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        tokens = x.transpose(1, 3).reshape(1, -1, 16)
        scores = tokens @ tokens.transpose(1, 2)
        half = x[:, :8]
        return scores.sum() + (half * x.mean((2, 3), keepdim=True)[:, :8].expand_as(half)).sum()


def test_views_onnx_runs_as_copies_are_recorded_before_the_op_that_reads_them():
    ops = cost.trace_module(_Copies(), 8).ops
    copies = [(o.op, o.geom, o.fused) for o in ops if o.op in cost.COPYING_VIEWS]
    assert copies[:2] == [("permute", (0, 2, 3, 1), True), ("permute", (0, 3, 1, 2), True)]
    assert [o.op for o in ops[:4]] == ["convolution", "permute", "native_layer_norm", "permute"]
    assert ("transpose", (0, 3, 2, 1), False) in copies  # the clone a reshape makes is the transpose's copy
    assert not any(o.op == "clone" for o in ops)
    assert [o.op for o in ops].count("transpose") == 1  # the one a matrix product reads is no copy
    assert ("slice", (), True) in copies and ("expand", (), True) in copies


def test_a_view_that_moves_no_data_is_no_copy():
    class _Free(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(1, 0, 2, 3)[:, :, :].flatten(1).unsqueeze(0).expand(1, -1, -1) * 2

    assert not any(o.op in cost.COPYING_VIEWS for o in cost.trace_module(_Free(), 8).ops)
