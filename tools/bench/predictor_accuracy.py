"""Publish the latency predictor's error on this machine.

Times edgetl's calibration models and held-out catalog models of both zoos in one session, each in its steady
state as calibrate does (alone, warmed up, then the minimum of many consecutive runs; batch 1, 224x224,
ONNX Runtime fp32), then calibrates a profile of this machine (``edgetl.calibrate.api.calibrate(measurements=...)``)
that never sees a held-out model: the roofline is fitted on the calibration models, the kernels are profiled in
the calibration models and sampled for micro-graphs from every other catalog architecture. It then predicts the
held-out models and prints predicted vs measured per model, the share within ±10% and ±20%, and the Spearman rank
correlation of three predictors side by side:

- **kernel-level** (what a calibrated profile predicts with): the sum over the model's kernels of the kernel timings;
- **roofline**: the per-op-class roofline fitted to the calibration models' whole-model timings (the predictor of
  profiles without kernel timings, and edgetl's before kernel-level calibration);
- **naive**: one ms-per-GFLOP constant fitted on the same calibration runs.

Then memory: the session peak RSS of each held-out model (ONNX Runtime
fp32, each in a fresh process), predicted with the memory model calibrate fits (``memory.rss_fit``, fitted
on ``MEMORY_MODELS``) and with the plain weights + activations + constant, against the measurement
(target: within ±25%).

    python tools/bench/predictor_accuracy.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

from edgetl.calibrate.api import CALIBRATION_MODELS, MEMORY_MODELS, calibrate
from edgetl.calibrate.measure import measure_memory, measure_models
from edgetl.device.latency import predict_latency, predict_memory
from edgetl.device.profiles import load_profile
from edgetl.zoo.catalog import get_card, list_models
from edgetl.zoo.model_cost import trace_model

HELD_OUT = (
    "resnet34", "resnet101", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v3_large", "efficientnet_b1",
    "efficientnet_b2", "regnet_y_400mf", "regnet_x_800mf", "regnet_y_800mf", "mnasnet0_5", "mnasnet1_0",
    "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "googlenet", "alexnet", "vgg11", "swin_t",
    "vit_b_16",
    # timm: re-parameterised (MobileOne, RepViT, FastViT), attention (MobileViTv2, EfficientFormerV2, EfficientViT,
    # MobileNetV4 hybrid), SiLU, GELU and hard-swish activations
    "timm/mobilenetv4_conv_medium", "timm/fastvit_t12", "timm/repvit_m1_1", "timm/mobileone_s1",
    "timm/efficientvit_b1", "timm/lcnet_100", "timm/convnext_pico", "timm/mobilevitv2_100",
    "timm/efficientformerv2_s1", "timm/mobilenetv4_hybrid_medium", "timm/tinynet_b", "timm/regnety_008",
)


def _share_within(ratios: list[float], tol: float) -> float:
    return 100.0 * sum(1 for r in ratios if abs(r - 1) <= tol) / len(ratios)


def _report(name: str, ratios: list[float], predicted: list[float], measured: list[float]) -> str:
    rho = spearmanr(predicted, measured).statistic
    return (
        f"{name:<28} within ±10%: {_share_within(ratios, 0.1):5.1f}%   within ±20%: {_share_within(ratios, 0.2):5.1f}%"
        f"   Spearman: {rho:.3f}   median |error|: {100 * statistics.median(abs(r - 1) for r in ratios):.1f}%"
    )


def _memory_rows(held: list[str], memory: dict[str, float], profile, resolution: int) -> list[tuple]:
    """(model, weights MB, predicted with the fit, predicted without it, measured) per held-out model."""
    bare = profile.model_copy(deep=True)
    bare.memory.rss_fit = None  # today's predictor: weights + activations + runtime_overhead_mb
    rows = []
    for m in held:
        trace = trace_model(m, resolution)
        rows.append((m, trace.params * 4 / 1e6, predict_memory(trace, profile, "fp32").memory_mb,
                     predict_memory(trace, bare, "fp32").memory_mb, memory[m]))
    return rows


def _print_memory(rows: list[tuple]) -> None:
    print("\nheld-out models: session peak RSS (ONNX Runtime fp32, each in a fresh process: load + 3 runs), MB")
    print(f"{'model':<22}{'weights':>9}{'predicted':>11}{'before':>9}{'measured':>10}{'ratio':>8}{'before r':>10}")
    for m, w, pred, bare, meas in rows:
        print(f"{m:<22}{w:9.1f}{pred:11.1f}{bare:9.1f}{meas:10.1f}{pred / meas:8.2f}{bare / meas:10.2f}")
    for name, col in (("memory, fitted (rss_fit)", 2), ("memory, weights+acts+const", 3)):
        ratios = [r[col] / r[4] for r in rows]
        median = 100 * statistics.median(abs(r - 1) for r in ratios)
        print(f"{name:<28} within ±25%: {_share_within(ratios, 0.25):5.1f}%   within ±10%: "
              f"{_share_within(ratios, 0.1):5.1f}%   median |error|: {median:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30, help="timed runs per model")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--models", nargs="*", default=list(HELD_OUT), help="held-out models to predict")
    parser.add_argument("--kernel-samples", type=int, default=400, help="micro-graphs calibrate times")
    args = parser.parse_args()

    start = time.monotonic()
    held = [m for m in args.models if get_card(m).name not in {get_card(c).name for c in CALIBRATION_MODELS}]
    # One session for the calibration and the held-out models, each timed alone in its steady state as
    # calibrate and a deployment run it; the held-out models are timed the same way as the fitted ones.
    measured = measure_models([*CALIBRATION_MODELS, *held], resolution=args.resolution, threads=args.threads,
                              rounds=args.rounds)
    memory = measure_memory([*MEMORY_MODELS, *held], resolution=args.resolution, threads=args.threads)
    held_names = {get_card(m).name for m in held}
    sources = [c.name for c in list_models(default_only=True) if c.name not in held_names]
    with tempfile.TemporaryDirectory() as tmp:
        cal = calibrate(
            name="bench-local", out=Path(tmp) / "bench-local.yaml", threads=args.threads, rounds=args.rounds,
            resolution=args.resolution, measurements=measured, memory_mb={m: memory[m] for m in MEMORY_MODELS},
            int8=False,  # fp32 only here
            kernel_models=sources, kernel_samples=args.kernel_samples,
        )
        profile = load_profile(str(cal.path))
    print(f"timed {len(measured)} models (steady state), calibrated on the {len(CALIBRATION_MODELS)} calibration "
          f"models (kernels sampled from {len(sources)} architectures, none held out) in "
          f"{time.monotonic() - start:.0f} s; calibrate itself took {cal.seconds:.0f} s; roofline fit ratios "
          "(pred/meas):")
    print("  " + ", ".join(f"{m} {r:.2f}" for m, r in cal.ratios.items()))
    print("memory fit (MB measured, fitted/measured): " + ", ".join(
        f"{m} {cal.memory_mb[m]:.0f} ({r:.2f})" for m, r in cal.memory_ratios.items()))
    _print_latency(held, measured, cal, profile, args)
    _print_memory(_memory_rows(held, memory, profile, args.resolution))
    print(f"\ntotal {time.monotonic() - start:.0f} s")


def _print_latency(held: list[str], measured: dict, cal, profile, args: argparse.Namespace) -> None:
    # the naive way: one ms-per-GFLOP constant, least squares on the calibration runs
    cal_flops = [trace_model(m, args.resolution).flops / 1e9 for m in cal.measurements]
    cal_ms = [m.min_ms for m in cal.measurements.values()]
    ms_per_gflop = sum(f * t for f, t in zip(cal_flops, cal_ms, strict=True)) / sum(f * f for f in cal_flops)
    roofline = profile.model_copy(update={"kernels": None})

    rows = []
    for m in held:
        trace = trace_model(m, args.resolution)
        rows.append((m, trace.flops / 1e9, predict_latency(trace, profile, "fp32", 1).latency_ms,
                     predict_latency(trace, roofline, "fp32", 1).latency_ms, trace.flops / 1e9 * ms_per_gflop,
                     measured[m].min_ms, measured[m].cv))

    print(f"\nheld-out models, batch 1, {args.resolution}x{args.resolution}, ONNX Runtime fp32, {args.threads} threads")
    print(f"{'model':<30}{'GFLOP':>7}{'kernels':>9}{'roofline':>10}{'naive':>8}{'measured':>10}"
          f"{'ratio':>7}{'roof r':>8}{'naive r':>8}{'CV':>6}")
    for m, gf, kern, roof, naive, meas, cv in rows:
        print(f"{m:<30}{gf:7.2f}{kern:9.2f}{roof:10.2f}{naive:8.2f}{meas:10.2f}"
              f"{kern / meas:7.2f}{roof / meas:8.2f}{naive / meas:8.2f}{cv:6.2f}")
    measured_ms = [r[5] for r in rows]
    print()
    for label, col in (("edgetl kernel-level", 2), ("edgetl roofline (fitted)", 3), ("naive ms-per-GFLOP", 4)):
        predicted = [r[col] for r in rows]
        print(_report(label, [p / t for p, t in zip(predicted, measured_ms, strict=True)], predicted, measured_ms))


if __name__ == "__main__":
    main()
