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

**An honest hold-out.** A model held out by name can still be made of kernels the calibration measured (ResNet-34's
convolutions are all ResNet-18's and ResNet-50's): its prediction is then in-sample. Each held-out model is put in
one of two groups by the kernel model's own keys (:meth:`edgetl.device.kernel_model.KernelModel.coverage`): *seen*,
every convolution and matrix product measured by the calibration, and *novel*, some never measured; the shares and
Spearman are reported per group. Entries ``NAME@RES`` are timed and predicted at that resolution (other resolutions
than the calibration's give novel kernels).

**An independent stopwatch.** Each held-out model is also timed the way a user would, with nothing of edgetl's:
a plain ``torch.onnx.export`` (opset 17, TorchScript exporter, batch 1, no simplification), a plain ONNX Runtime
session (its default options, the profile's threads), the minimum of N runs after 5 warm-up, in round-robin passes
(each model's session loaded, warmed and timed alone, then released). Predictions are reported against the
stopwatch beside against edgetl's own timing, with the median signed error (a bias shows there).

Then memory: the session peak RSS of each held-out model (ONNX Runtime
fp32, each in a fresh process), predicted with the memory model calibrate fits (``memory.rss_fit``, fitted
on ``MEMORY_MODELS``) and with the plain weights + activations + constant, against the measurement
(target: within ±25%).

    python tools/bench/predictor_accuracy.py --threads 2
    python tools/bench/predictor_accuracy.py --threads 2 --skip-memory   # latency only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

from edgetl.calibrate.api import CALIBRATION_MODELS, MEMORY_MODELS, calibrate
from edgetl.calibrate.measure import Measurement, measure_memory, measure_models
from edgetl.device.latency import predict_latency, predict_memory
from edgetl.device.profiles import load_profile
from edgetl.zoo.catalog import deployed_model, get_card, list_models
from edgetl.zoo.model_cost import trace_model
from edgetl.zoo.weights import load_model

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
    # novel kernels: other resolutions than the calibration's, other timm families, other widths and depths
    "resnet34@160", "mobilenet_v3_large@192", "efficientnet_b1@256", "regnet_y_400mf@288", "timm/lcnet_100@256",
    "timm/ghostnet_100", "timm/tf_efficientnet_lite0", "timm/convnext_atto", "timm/repvit_m0_9",
    "timm/mobilevitv2_050", "timm/fastvit_t8", "timm/mobileone_s0@192",
)
#: Warm-up runs of the stopwatch, as the issue's user timed.
STOPWATCH_WARMUP = 5


def _share_within(ratios: list[float], tol: float) -> float:
    return 100.0 * sum(1 for r in ratios if abs(r - 1) <= tol) / len(ratios)


def _report(name: str, ratios: list[float], predicted: list[float], measured: list[float]) -> str:
    rho = spearmanr(predicted, measured).statistic if len(ratios) > 2 else float("nan")
    return (
        f"{name:<34} n={len(ratios):<3} within ±10%: {_share_within(ratios, 0.1):5.1f}%   within ±20%: "
        f"{_share_within(ratios, 0.2):5.1f}%   Spearman: {rho:.3f}   median |error|: "
        f"{100 * statistics.median(abs(r - 1) for r in ratios):.1f}%   median signed: "
        f"{100 * statistics.median(r - 1 for r in ratios):+.1f}%"
    )


def _entry(entry: str, default: int) -> tuple[str, int]:
    """``NAME@RES`` (or ``NAME``, at ``default``) as the catalog name and the resolution."""
    name, _, res = entry.partition("@")
    return name, int(res) if res else default


def _measure_entries(entries: list[str], default: int, threads: int, rounds: int) -> dict[str, Measurement]:
    """Each entry timed as calibrate times (steady state), grouped by resolution; keyed by entry."""
    by_res: dict[int, list[str]] = {}
    for e in entries:
        by_res.setdefault(_entry(e, default)[1], []).append(e)
    out: dict[str, Measurement] = {}
    for res, group in by_res.items():
        timed = measure_models([_entry(e, default)[0] for e in group], resolution=res, threads=threads,
                               rounds=rounds)
        out.update({e: timed[_entry(e, default)[0]] for e in group})
    return {e: out[e] for e in entries}


def _plain_export(name: str, res: int, path: Path) -> None:
    """The model exported as a user would: ``torch.onnx.export``, opset 17, TorchScript exporter (torch's
    default, the dynamo exporter, where TorchScript cannot), batch 1, no simplification (the deployed form:
    re-parameterisable timm models fused, as a user deploys them)."""
    import torch

    card = get_card(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = deployed_model(load_model(card, weights=None, resolution=res).model, card).eval()
    x = (torch.randn(1, 3, res, res),)
    try:
        torch.onnx.export(model, x, str(path), opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["logits"])
    except Exception as exc:  # e.g. an operator TorchScript cannot export at opset 17
        print(f"stopwatch: {name}: TorchScript export failed ({type(exc).__name__}); torch's default exporter")
        torch.onnx.export(model, x, str(path), opset_version=17, input_names=["input"], output_names=["logits"])


def stopwatch(entries: list[str], default: int, threads: int, runs: int, passes: int = 3) -> dict[str, float]:
    """The fastest of ``runs`` runs (ms) of each entry's plain export in a plain ONNX Runtime session, in
    ``passes`` round-robin passes (each: load, :data:`STOPWATCH_WARMUP` warm-up runs, ``runs / passes`` timed)."""
    import numpy as np
    import onnxruntime as ort

    best = {e: float("inf") for e in entries}
    with tempfile.TemporaryDirectory(prefix="stopwatch-") as tmp:
        paths = {e: Path(tmp) / f"{i}.onnx" for i, e in enumerate(entries)}
        for e in entries:
            try:
                _plain_export(*_entry(e, default), paths[e])
            except Exception as exc:  # one model a user could not export must not end the benchmark
                print(f"stopwatch: {e} not exported: {type(exc).__name__}: {str(exc)[:200]}")
                best[e] = float("nan")
        for _ in range(passes):
            for e in [e for e in entries if best[e] == best[e]]:
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(paths[e]), options, providers=["CPUExecutionProvider"])
                res = _entry(e, default)[1]
                feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
                    (1, 3, res, res), dtype=np.float32)}
                for _ in range(STOPWATCH_WARMUP):
                    session.run(None, feed)
                for _ in range(-(-runs // passes)):
                    t0 = time.perf_counter()
                    session.run(None, feed)
                    best[e] = min(best[e], (time.perf_counter() - t0) * 1e3)
                del session
    return best


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
    parser.add_argument("--models", nargs="*", default=list(HELD_OUT), help="held-out models to predict (NAME@RES)")
    parser.add_argument("--kernel-samples", type=int, default=400, help="micro-graphs calibrate times")
    parser.add_argument("--stopwatch-runs", type=int, default=25, help="runs of the independent stopwatch (0: none)")
    parser.add_argument("--skip-memory", action="store_true", help="latency only")
    parser.add_argument("--keep", type=Path, help="write the profile and the per-model rows (rows.json) here, to "
                        "study the kernel model's fit without timing again")
    args = parser.parse_args()

    start = time.monotonic()
    calibration_names = {get_card(c).name for c in CALIBRATION_MODELS}
    held = [e for e in args.models if get_card(_entry(e, args.resolution)[0]).name not in calibration_names]
    # One session for the calibration and the held-out models, each timed alone in its steady state as
    # calibrate and a deployment run it; the held-out models are timed the same way as the fitted ones.
    measured = {**measure_models(CALIBRATION_MODELS, resolution=args.resolution, threads=args.threads,
                                 rounds=args.rounds),
                **_measure_entries(held, args.resolution, args.threads, args.rounds)}
    # The stopwatch right after edgetl's own whole-model timings, so that a shared host's slower minutes later on
    # (other tenants) are not taken for the predictor's error.
    watch = stopwatch(held, args.resolution, args.threads, args.stopwatch_runs) if args.stopwatch_runs else {}
    memory = ({} if args.skip_memory else
              measure_memory(MEMORY_MODELS, resolution=args.resolution, threads=args.threads))
    held_names = {get_card(_entry(e, args.resolution)[0]).name for e in held}
    sources = [c.name for c in list_models(default_only=True) if c.name not in held_names]
    with tempfile.TemporaryDirectory() as tmp:
        cal = calibrate(
            name="bench-local", out=Path(tmp) / "bench-local.yaml", threads=args.threads, rounds=args.rounds,
            resolution=args.resolution, measurements={m: measured[m] for m in CALIBRATION_MODELS},
            memory_mb=memory or None, int8=False,  # fp32 only here
            kernel_models=sources, kernel_samples=args.kernel_samples,
        )
        profile = load_profile(str(cal.path))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(cal.path, args.keep / cal.path.name)
    print(f"timed {len(measured)} models (steady state), calibrated on the {len(CALIBRATION_MODELS)} calibration "
          f"models (kernels sampled from {len(sources)} architectures, none held out) in "
          f"{time.monotonic() - start:.0f} s; calibrate itself took {cal.seconds:.0f} s; roofline fit ratios "
          "(pred/meas):")
    print("  " + ", ".join(f"{m} {r:.2f}" for m, r in cal.ratios.items()))
    if cal.noise is not None:
        print(f"noise during the kernel timings: {cal.noise.text()}")
    _print_latency(held, measured, watch, cal, profile, args)
    if not args.skip_memory:
        print("memory fit (MB measured, fitted/measured): " + ", ".join(
            f"{m} {cal.memory_mb[m]:.0f} ({r:.2f})" for m, r in cal.memory_ratios.items()))
        held_memory = measure_memory([_entry(e, args.resolution)[0] for e in held if "@" not in e],
                                     resolution=args.resolution, threads=args.threads)
        _print_memory(_memory_rows(list(held_memory), held_memory, profile, args.resolution))
    print(f"\ntotal {time.monotonic() - start:.0f} s")


def _rows(held: list[str], measured: dict, watch: dict[str, float], cal, profile, args) -> list[dict]:
    """Per held-out entry: predictions of the three predictors, edgetl's timing, the stopwatch, the coverage."""
    cal_flops = [trace_model(m, args.resolution).flops / 1e9 for m in cal.measurements]
    cal_ms = [m.min_ms for m in cal.measurements.values()]
    ms_per_gflop = sum(f * t for f, t in zip(cal_flops, cal_ms, strict=True)) / sum(f * f for f in cal_flops)
    roofline = profile.model_copy(update={"kernels": None})
    kernels = profile.kernel_model()
    rows = []
    for e in held:
        trace = trace_model(*_entry(e, args.resolution))
        seen, total = kernels.coverage(trace)
        rows.append({"model": e, "gflop": trace.flops / 1e9, "seen": seen, "total": total,
                     "kernels": predict_latency(trace, profile, "fp32", 1).latency_ms,
                     "roofline": predict_latency(trace, roofline, "fp32", 1).latency_ms,
                     "naive": trace.flops / 1e9 * ms_per_gflop, "measured": measured[e].min_ms,
                     "cv": measured[e].cv, "stopwatch": watch.get(e, float("nan"))})
    return rows


def _print_latency(held: list[str], measured: dict, watch: dict[str, float], cal, profile,
                   args: argparse.Namespace) -> None:
    rows = _rows(held, measured, watch, cal, profile, args)
    if args.keep:
        (args.keep / "rows.json").write_text(json.dumps(rows, indent=1))
    print(f"\nheld-out models, batch 1, ONNX Runtime fp32, {args.threads} threads (NAME@RES: at RES px, else "
          f"{args.resolution}); seen: compute kernels the calibration measured / all")
    print(f"{'model':<32}{'GFLOP':>7}{'seen':>9}{'kernels':>9}{'roofline':>10}{'naive':>8}{'measured':>10}"
          f"{'stopwatch':>10}{'ratio':>7}{'r watch':>8}{'roof r':>8}{'CV':>6}")
    for r in rows:
        print(f"{r['model']:<32}{r['gflop']:7.2f}{r['seen']:>5}/{r['total']:<3}{r['kernels']:9.2f}"
              f"{r['roofline']:10.2f}{r['naive']:8.2f}{r['measured']:10.2f}{r['stopwatch']:10.2f}"
              f"{r['kernels'] / r['measured']:7.2f}{r['kernels'] / r['stopwatch']:8.2f}"
              f"{r['roofline'] / r['measured']:8.2f}{r['cv']:6.2f}")
    in_sample = [(predict_latency(trace_model(m, args.resolution), profile, "fp32", 1).latency_ms, meas.min_ms)
                 for m, meas in cal.measurements.items()]
    print("\ncalibration models (in-sample: their kernels were profiled in place), against edgetl's timing")
    print(_report("kernel-level vs edgetl timing", [p / t for p, t in in_sample], [p for p, _ in in_sample],
                  [t for _, t in in_sample]))
    groups = {"all": rows, "seen (all kernels measured)": [r for r in rows if r["seen"] == r["total"]],
              "novel (kernels never measured)": [r for r in rows if r["seen"] < r["total"]]}
    for group, members in groups.items():
        if not members:
            continue
        print(f"\n{group}: {len(members)} models")
        for label, col, ref in (("kernel-level vs edgetl timing", "kernels", "measured"),
                                ("kernel-level vs stopwatch", "kernels", "stopwatch"),
                                ("roofline vs edgetl timing", "roofline", "measured"),
                                ("naive vs edgetl timing", "naive", "measured"),
                                ("edgetl timing vs stopwatch", "measured", "stopwatch")):
            pairs = [(r[col], r[ref]) for r in members if r[ref] == r[ref]]  # no NaN (stopwatch off)
            if pairs:
                print(_report(label, [p / t for p, t in pairs], [p for p, _ in pairs], [t for _, t in pairs]))


if __name__ == "__main__":
    main()
