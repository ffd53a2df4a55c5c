import pytest

from edgetl.device.latency import (
    Roofline,
    fit_memory,
    int8_speedup,
    int8_speedup_for_isa,
    model_size_mb,
    predict_latency,
    predict_memory,
)
from edgetl.device.profiles import list_profiles, load_profile
from edgetl.zoo import cost, model_cost


def _trace(ops):
    return cost.CostTrace("toy", 8, "x", params=1000, peak_activation=500, input_elements=192, ops=ops)


def test_roofline_arithmetic_by_hand():
    roof = Roofline(
        peak_flops=1e9, bandwidth=1e9, efficiency=dict.fromkeys(cost.OP_CLASSES, 0.5), kernel_overhead=1e-6
    )
    ops = [
        cost.OpCost("convolution", "conv", flops=1e6, weight=100, act_in=50, act_out=50, fused=False),
        cost.OpCost("relu_", "elementwise", flops=50, weight=0, act_in=50, act_out=50, fused=True),
        cost.OpCost("mean", "pool", flops=10, weight=0, act_in=2e5, act_out=10, fused=False),
    ]
    pred = predict_latency(_trace(ops), roof, "fp32", batch=1)
    conv = max(1e6 / 0.5e9, (100 + 100) * 4 / 1e9) + 1e-6  # compute bound
    pool = max(10 / 0.5e9, (2e5 + 10) * 4 / 1e9) + 1e-6  # memory bound
    assert pred.latency_ms == pytest.approx((conv + pool) * 1e3)
    assert pred.kernels == 2
    assert pred.fps == pytest.approx(1000 / pred.latency_ms)


def test_batch_scales_activations_not_weights():
    roof = Roofline(1e12, 1e9, dict.fromkeys(cost.OP_CLASSES, 1.0), 0.0)
    ops = [cost.OpCost("addmm", "matmul", flops=2e3, weight=1_000_000, act_in=1000, act_out=1000, fused=False)]
    one = predict_latency(_trace(ops), roof, "fp32", 1).latency_ms
    eight = predict_latency(_trace(ops), roof, "fp32", 8).latency_ms
    assert one < eight < 8 * one  # weight traffic is shared by the batch


def test_memory_and_size_shrink_with_precision():
    profile = load_profile("x86-avx2")
    trace = model_cost.trace_model("resnet18", 64)
    fp32 = predict_memory(trace, profile, "fp32")
    int8 = predict_memory(trace, profile, "int8")
    assert int8.weights_mb == pytest.approx(fp32.weights_mb / 4)
    assert fp32.memory_mb == pytest.approx(fp32.weights_mb + fp32.activations_mb + fp32.runtime_mb)
    assert model_size_mb(trace.params, "fp16") == pytest.approx(trace.params * 2 / 1e6)


def _references():
    """Every reference, skipped (with the reason) unless it is a like-with-like, held-out check."""
    for profile in list_profiles():
        held_out = profile.held_out_references()
        for ref in profile.reference:
            marks = []
            if ref.runtime != profile.runtime:
                why = f"measured with {ref.runtime}; {profile.name} predicts {profile.runtime}"
                marks = [pytest.mark.skip(reason=why)]
            elif ref.used_for_fit:
                marks = [pytest.mark.skip(reason=f"{profile.name}'s efficiencies were fitted to it: no held-out check")]
            assert (not marks) == (ref in held_out)
            yield pytest.param(profile, ref, id=f"{profile.name}-{ref.model}-{ref.precision}", marks=marks)


@pytest.mark.parametrize(("profile", "ref"), list(_references()))
def test_prediction_of_every_held_out_reference_of_the_same_runtime_is_within_2x(profile, ref):
    trace = model_cost.trace_model(ref.model, ref.resolution)
    pred = predict_latency(trace, profile, ref.precision, ref.batch).latency_ms
    ratio = pred / ref.latency_ms
    where = f"{profile.name} {ref.model} {ref.precision}"
    assert 0.5 <= ratio <= 2.0, f"{where}: predicted {pred:.2f} ms, published {ref.latency_ms} ms"


def test_int8_speed_up_comes_from_the_isa():
    assert int8_speedup_for_isa(["sse4_2", "avx2", "fma"])[0] == 1.0  # no VNNI: no INT8 speed-up
    assert int8_speedup_for_isa(["avx2", "avx512f", "avx512-vnni"])[0] == 4.0
    assert int8_speedup_for_isa(["avx512_vnni", "amx_int8"])[0] == 8.0
    assert int8_speedup_for_isa(["neon", "asimddp"])[0] == 4.0 and int8_speedup_for_isa(["neon"])[0] == 2.0
    assert int8_speedup_for_isa(["riscv-v"]) is None


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small"])
def test_int8_is_predicted_no_faster_without_an_int8_instruction(model):
    trace = model_cost.trace_model(model, 64)
    avx2, vnni = load_profile("x86-avx2"), load_profile("x86-avx512-vnni")
    # depthwise layers are memory-bound: bytes alone would make INT8 look faster on a CPU that has no INT8 path
    assert predict_latency(trace, avx2, "int8").latency_ms >= predict_latency(trace, avx2, "fp32").latency_ms
    assert predict_latency(trace, vnni, "int8").latency_ms < 0.9 * predict_latency(trace, vnni, "fp32").latency_ms
    data = vnni.model_dump(mode="json", exclude_none=True)
    data["cpu"]["isa"] = [*data["cpu"]["isa"], "amx_int8"]
    amx = type(vnni).model_validate({**data, "name": "x86-amx", "aliases": []})
    assert predict_latency(trace, amx, "int8").latency_ms < predict_latency(trace, vnni, "int8").latency_ms
    assert int8_speedup(avx2) == int8_speedup_for_isa(avx2.cpu.isa)


def test_only_held_out_references_of_the_profiles_runtime_check_a_prediction():
    nano = load_profile("jetson-nano")
    checked = nano.held_out_references()
    assert checked and all(r.runtime == "tensorrt" and not r.used_for_fit for r in checked)
    assert "resnet18" not in {r.model for r in checked}  # its efficiencies were derived from resnet18
    assert load_profile("jetson-agx-orin-64gb").held_out_references() == []
    assert load_profile("raspberry-pi-5").held_out_references() == []  # ExecuTorch, not ONNX Runtime


def test_memory_fit_recovers_the_terms_and_predict_memory_uses_them():
    def trace(conv, fc, acts):
        ops = [cost.OpCost("convolution", "conv", flops=1e6, weight=conv, act_in=acts, act_out=acts, fused=False),
               cost.OpCost("addmm", "matmul", flops=1e3, weight=fc, act_in=10, act_out=10, fused=False)]
        return cost.CostTrace("toy", 8, "x", params=conv + fc, peak_activation=acts, input_elements=192, ops=ops)

    traces = [trace(1_000_000, 0, 400_000), trace(2_200_000, 1_300_000, 3_000_000), trace(11_200_000, 500_000, 800_000),
              trace(23_500_000, 2_100_000, 2_000_000), trace(9_400_000, 123_600_000, 3_200_000)]
    measured = [(3.2 * t.ops[0].weight + 1.8 * t.ops[1].weight + 1.5 * t.peak_activation) * 4 / 1e6 + 14.0
                for t in traces]
    fit = fit_memory(list(zip(traces, measured, strict=True)))
    assert fit.conv_weights_factor == pytest.approx(3.2, rel=1e-3)
    assert fit.weights_factor == pytest.approx(1.8, rel=1e-3)
    assert fit.activations_factor == pytest.approx(1.5, rel=1e-2) and fit.constant_mb == pytest.approx(14.0, rel=1e-2)
    assert fit.within(0.01) == 1.0

    data = load_profile("x86-avx2").model_dump(mode="json", exclude_none=True)
    data["memory"]["rss_fit"] = {"conv_weights_factor": 3.2, "weights_factor": 1.8, "activations_factor": 1.5,
                                 "constant_mb": 14.0, "derived": "fitted by hand"}
    profile = type(load_profile("x86-avx2")).model_validate(data)
    pred = predict_memory(traces[4], profile, "fp32")
    assert pred.memory_mb == pytest.approx(measured[4])
    assert pred.weights_mb == pytest.approx((3.2 * 9.4 + 1.8 * 123.6) * 4) and pred.runtime_mb == 14.0
    int8 = predict_memory(traces[4], profile, "int8")
    assert int8.weights_mb == pytest.approx(pred.weights_mb / 4)


def test_a_measured_int8_speed_up_replaces_the_isas():
    vnni = load_profile("x86-avx512-vnni")
    data = vnni.model_dump(mode="json", exclude_none=True)
    data["int8_speedup"] = {"value": 1.5, "derived": "measured by hand"}
    measured = type(vnni).model_validate(data)
    assert int8_speedup(measured) == (1.5, "measured: measured by hand")
    trace = model_cost.trace_model("resnet18", 64)
    slower = predict_latency(trace, measured, "int8").latency_ms
    assert slower > predict_latency(trace, vnni, "int8").latency_ms  # 1.5x instead of VNNI's 4x
    assert slower < predict_latency(trace, measured, "fp32").latency_ms
