"""``export()``: turn a fine-tuned run (or a catalog classifier) into a self-describing artifact folder.

The steps, all in a hidden folder beside ``out`` that is renamed into place at the end:

1. load the model (``load_trained_model`` for a run, ``edgetl.zoo.weights.load_model`` for a catalog name);
2. export FP32 ONNX (checker, shape inference, onnxslim) and check parity with PyTorch on the
   evaluation images: max |diff| <= 1e-4 and 100% top-1 agreement;
3. build the precision candidates: FP16 (``keep_io_types``), INT8 static QDQ calibrated on a
   stratified sample of the training images (or ``calib_data``), or INT8 dynamic for linear-heavy models;
4. measure each candidate's accuracy on the evaluation images and its latency on this machine
   (interleaved runs, because this *compares* candidates: drift hits them alike; ranked on the minimum),
   and predict its latency on the target device;
5. keep the fastest candidate within the accuracy budget (``precision="auto"``), or the one asked for;
6. optionally build a TensorRT engine and a C header; write labels, preprocessing and the manifest
   with every file's sha256; with ``sign_key``, sign the manifest (:mod:`edgetl.export.signing`);
   publish the folder.

A missed budget (accuracy drop, latency) raises :class:`~edgetl.errors.BudgetExceededError` (exit 3)
only after the artifact is written and its manifest records the failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.data.preprocess import PreprocessSpec
from edgetl.device import budget
from edgetl.device.machine import package_versions
from edgetl.device.profiles import DeviceProfile, default_device, load_profile, threads_for
from edgetl.errors import BudgetExceededError, ConfigError, ExportError
from edgetl.export import bundle, golden, signing
from edgetl.export.accuracy_control import control_accuracy, relative_error
from edgetl.export.evaluate import (
    EvalSet,
    ImageBatches,
    Record,
    agreement,
    collect_logits,
    drop_report,
    folder_calibration_records,
    folder_eval_set,
    image_batches,
    random_batches,
    run_eval_set,
    run_split_set,
    run_train_records,
    stratified_sample,
    top1,
)
from edgetl.export.tensorrt import build_tensorrt_engine, engine_precision, require_tensorrt
from edgetl.finetune.model import load_trained_model
from edgetl.options import ExportOptions, SourceOptions, TargetOptions, cap_threads, documented, take_inputs
from edgetl.runtime.bench import benchmark, benchmark_interleaved
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import TensorRTRunner
from edgetl.zoo import quantize
from edgetl.zoo.catalog import ModelCard, Preprocess, deployed_model, get_card
from edgetl.zoo.onnx_io import export_onnx
from edgetl.zoo.weights import load_model

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FP32_ATOL = 1e-4
FP16_RTOL = 1e-2
FP16_ATOL = 1e-3
SENSITIVITY_IMAGES = 32
"""Calibration images on which accuracy control scores each layer's sensitivity."""
CALIB_BATCH = 8
"""Images per calibration step: the calibrator holds every activation of one such batch, and no more."""
SPEED_MARGIN = 0.10
"""A lower precision must be this much faster (on the minimum and the 25th percentile of its latency)
to replace a higher one: on a shared machine a smaller difference is within the noise."""


@dataclass
class Artifact:
    """What :func:`export` wrote.

    Attributes:
        path: the artifact folder.
        manifest: the content of ``manifest.json``.
        precision: the precision of ``model.onnx`` (``fp32``, ``fp16`` or ``int8``).
        accuracy: fp32 and artifact top-1, agreement, drop and budget (see the manifest).
        latency: the latency report (device, runtime, p50/p90/p99/min, prediction, budget, pass).
        candidates: every precision that was built, with its latency, accuracy and why it was (not) chosen.
        failures: the budgets that were missed (empty when the export passed).
    """

    path: Path
    manifest: dict[str, Any]
    precision: str
    accuracy: dict[str, Any]
    latency: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def model_path(self) -> Path:
        return self.path / bundle.MODEL_FILE

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("files", {}))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "passed": self.passed, "failures": list(self.failures), **self.manifest}


@dataclass
class _Source:
    model: torch.nn.Module
    kind: str
    card: ModelCard
    classes: list[str]
    preprocess: Preprocess
    resolution: int
    description: dict[str, Any]
    eval_set: EvalSet | None
    train_records: list[Record]


@dataclass
class _Candidate:
    precision: str
    path: Path
    mode: str
    quant: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    predicted_ms: float | None = None
    rejected: str | None = None
    chosen: bool = False
    note: str | None = None

    def rank_latency(self, by: str, stat: str = "min") -> float:
        if by == "predicted":
            return self.predicted_ms if self.predicted_ms is not None else float("inf")
        return float(self.latency[f"{stat}_ms"]) if self.latency else float("inf")

    def beats(self, other: _Candidate, by: str) -> bool:
        """Faster than ``other`` by the margin on the minimum and on the 25th percentile (one lucky run
        on a noisy machine must not decide)."""
        return all(self.rank_latency(by, s) < other.rank_latency(by, s) * (1 - SPEED_MARGIN) for s in _stats(by))

    def versus(self, other: _Candidate, by: str) -> str:
        """The figures the choice compared, this candidate's first: ``predicted 1.514 vs 1.514 ms``, or
        ``measured here min 1.200 vs 1.310 ms, p25 1.400 vs 1.350 ms``."""
        def ms(value: float) -> str:
            return f"{value:.3f}" if np.isfinite(value) else "not timed"

        pairs = ", ".join(f"{'' if by == 'predicted' else s + ' '}{ms(self.rank_latency(by, s))} vs "
                          f"{ms(other.rank_latency(by, s))} ms" for s in _stats(by))
        return f"{'predicted' if by == 'predicted' else 'measured here'} {pairs}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "mode": self.mode,
            "file_bytes": self.path.stat().st_size if self.path.exists() else None,
            "latency": self.latency,
            "predicted_ms": None if self.predicted_ms is None else round(self.predicted_ms, 4),
            "accuracy": self.accuracy,
            "parity": self.parity,
            "quantization": self.quant,
            "within_budget": self.rejected is None,
            "rejected": self.rejected,
            "chosen": self.chosen,
            "note": self.note,
        }


# --- options and source --------------------------------------------------------------------------


def _is_run_dir(source: str | os.PathLike[str]) -> bool:
    return Path(source).expanduser().exists()


def _load_source(source: str | os.PathLike[str], weights: str | None, weights_dir: str | os.PathLike[str] | None,
                 resolution: int | None, data: str | os.PathLike[str] | None) -> _Source:

    if _is_run_dir(source):
        if weights is not None:
            raise ConfigError(f"{source} is a run folder: it has its own weights; drop --weights")
        trained = load_trained_model(source, device="cpu")
        if resolution is not None and resolution != trained.resolution:
            raise ConfigError(
                f"{source} was trained at {trained.resolution}px; export it at that resolution (drop --resolution)"
            )
        eval_set = folder_eval_set(data, trained.classes) if data else run_eval_set(source)
        meta = trained.checkpoint
        description = {
            "kind": "run",
            "run_dir": str(Path(source).expanduser().resolve()),
            "model": trained.card.id,
            "model_name": trained.card.name,
            "family": trained.card.family,
            "weights": meta.get("weights"),
            "strategy": (meta.get("strategy") or {}).get("strategy"),
            "epoch": meta.get("epoch"),
            "run_metrics": {k: v for k, v in trained.metrics.items() if k in ("val_accuracy", "test_accuracy")},
        }
        return _Source(
            model=deployed_model(trained.network.eval(), trained.card), kind="run", card=trained.card,
            classes=list(trained.classes), preprocess=trained.preprocess, resolution=trained.resolution,
            description=description, eval_set=eval_set, train_records=run_train_records(source),
        )

    if weights is None:
        card = get_card(str(source))  # an unknown name says so, with suggestions
        raise ConfigError(
            f"'{source}' is not a run folder; to export the ImageNet classifier {card.name} itself, "
            "pass --weights imagenet (or a state_dict PATH, or none for random weights)"
        )
    card = get_card(str(source))
    res = int(resolution or card.resolution)
    if res < max(card.min_size):
        raise ConfigError(f"{card.name} needs an input of at least {card.min_size[0]}x{card.min_size[1]}; got {res}")
    loaded = load_model(card, weights=weights, weights_dir=weights_dir, resolution=res)
    classes = list(card.categories) or [f"class_{i}" for i in range(card.num_classes)]
    preprocess = card.preprocess.at_resolution(res)
    description = {
        "kind": "catalog",
        "model": card.id,
        "model_name": card.name,
        "family": card.family,
        "weights": loaded.describe(),
    }
    if not loaded.pretrained:
        log.warning("exporting %s with random weights: its accuracy means nothing (fine for timing)", card.name)
    return _Source(
        model=deployed_model(loaded.model.eval(), card), kind="catalog", card=card, classes=classes,
        preprocess=preprocess, resolution=res, description=description,
        eval_set=folder_eval_set(data, classes) if data else None, train_records=[],
    )


def _reduce_range(profile: DeviceProfile) -> bool:
    """7-bit weights on x86 CPUs without VNNI (ONNX Runtime's U8S8 AVX2 path can saturate)."""
    x86 = profile.family == "x86" or profile.has_isa("avx2") or profile.has_isa("sse4_2")
    vnni = profile.has_isa("avx512_vnni") or profile.has_isa("avx_vnni") or profile.has_isa("amx_int8")
    return x86 and not vnni


def _fast_fp16(profile: DeviceProfile) -> bool:
    return "fp16" in profile.precisions and profile.runtime == "tensorrt"


# --- the steps -----------------------------------------------------------------------------------


def _calibration(src: _Source, calib_data: str | os.PathLike[str] | None, calib_size: int,
                 seed: int) -> tuple[list[Record], str] | None:
    if calib_data is not None:
        records, where = folder_calibration_records(calib_data), str(calib_data)
    elif src.train_records:
        records, where = src.train_records, f"training images of {src.description.get('run_dir')}"
    else:
        return None
    sample = stratified_sample(records, calib_size, seed)
    return sample, f"{len(sample)} of {len(records)} {where} (stratified, eval transform)"


def _build_candidates(src: _Source, fp32_path: Path, work: Path, job: _Job,
                      calib: tuple[list[Record], str] | None) -> list[_Candidate]:
    candidates = [_Candidate("fp32", fp32_path, "fp32")]
    if "fp16" in job.wanted:
        job.say("converting to FP16")
        report = quantize.convert_fp16(fp32_path, work / "fp16.onnx")
        candidates.append(_Candidate("fp16", report.path, "fp16", quant=report.to_dict()))
    if "int8" in job.wanted:
        int8 = _int8_candidate(src, fp32_path, work, job, calib)
        if int8 is not None:
            candidates.append(int8)
    for c in candidates:
        if c.quant:
            c.quant.pop("path", None)
    return candidates


def _int8_mode(job: _Job, fp32_path: Path) -> str:
    """The INT8 mode asked for, adjusted to the device and the calibration data (or an error)."""
    asked, profile = job.opts.int8_mode, job.profile
    mode = quantize.resolve_int8_mode(asked, fp32_path)
    if profile.runtime == "tensorrt" and mode == "dynamic":
        if asked == "dynamic":
            raise ConfigError(
                f"{profile.name} runs TensorRT, whose ONNX parser takes INT8 only as Q/DQ pairs, not dynamic "
                "quantization (MatMulInteger); use --int8-mode static"
            )
        mode = "static"  # a linear-heavy model still gets QDQ for TensorRT
    if job.opts.calibration.data is not None and mode == "dynamic":
        if asked == "dynamic":
            raise ConfigError("--calib-data calibrates static INT8, and --int8-mode dynamic needs none; "
                              "drop one of them")
        job.say("calibration images given: static INT8 for this linear-heavy model")
        mode = "static"
    return mode


def _int8_candidate(src: _Source, fp32_path: Path, work: Path, job: _Job,
                    calib: tuple[list[Record], str] | None) -> _Candidate | None:
    mode, opts = _int8_mode(job, fp32_path), job.opts
    if mode == "static" and calib is None:
        msg = ("static INT8 needs calibration images and a catalog model has no training split: "
               "pass --calib-data DIR")
        if opts.precision != "auto":
            raise ConfigError(msg)
        log.warning("skipping the INT8 candidate: %s", msg)
        job.skipped.append(f"int8: {msg}")
        return None
    if mode == "dynamic":
        job.say("quantizing INT8 (dynamic)")
        report = quantize.quantize_int8_dynamic(
            fp32_path, work / "int8.onnx", reduce_range=_reduce_range(job.profile),
            exclude_op_types=opts.exclude_op_types,
        )
        return _Candidate("int8", report.path, "dynamic", quant=report.to_dict())
    records, where = calib
    job.say(f"calibrating INT8 ({opts.calibration.method}) on {len(records)} images")
    batches = ImageBatches(records, src.preprocess, src.resolution, batch_size=CALIB_BATCH)
    report = _quantize_static(job, fp32_path, work / "int8.onnx", batches, opts.calibration.method)
    return _Candidate("int8", report.path, "static", quant={**report.to_dict(), "calibration_data": where})


def _quantize_static(job: _Job, fp32_path: Path, dst: Path, batches: Any, method: str,
                     keep_float: list[str] | None = None) -> quantize.QuantReport:
    """Static QDQ INT8 for the job's device; the activation ranges are cached beside ``fp32_path``, so
    re-quantizing with layers kept in float skips calibration."""
    return quantize.quantize_int8_static(
        fp32_path, dst, batches, calib_method=method, per_channel=True,
        reduce_range=_reduce_range(job.profile), symmetric_activations=job.profile.runtime == "tensorrt",
        exclude_op_types=job.opts.exclude_op_types, keep_float=keep_float or (),
        calibration_cache=fp32_path.parent / "int8.calibration.json",
    )


@dataclass
class _Reference:
    """PyTorch's logits on the evaluation inputs, which every candidate is judged against."""

    logits: np.ndarray
    labels: np.ndarray
    labelled: bool
    inputs: str
    fp32_top1: float | None


def _evaluate(src: _Source, candidates: list[_Candidate], threads: int | None, max_drop: float,
              calib: tuple[list[Record], str] | None, say: Callable[[str], None]) -> tuple[dict[str, Any], _Reference]:
    """Parity with torch and accuracy of every candidate on the evaluation images (decoded once)."""
    batches, labelled = _eval_batches(src, calib, say)
    logits, labels = _all_logits(src, candidates, threads, batches)
    fp32_top1 = top1(logits["torch"], labels) if labelled else None
    inputs = "evaluation images" if labelled else ("calibration images" if calib else "random normal inputs")
    ref = _Reference(logits["torch"], labels, labelled, inputs, fp32_top1)
    for c in candidates:
        _score(c, logits[c.precision], ref, max_drop)
    evaluation = {
        "measured": labelled,
        "source": src.eval_set.source if labelled else None,
        "chosen_on": src.eval_set.source if labelled else f"top-1 agreement with PyTorch on {inputs}",
        "unlabelled_reason": None if labelled else _unlabelled_reason(src),
        "images": len(ref.logits),
        "fp32_top1": None if fp32_top1 is None else round(fp32_top1, 4),
        "torch_onnx_max_abs_diff": candidates[0].parity["max_abs_diff"],
    }
    return evaluation, ref


def _unlabelled_reason(src: _Source) -> str:
    if src.kind == "run":
        return ("the run has no validation split, and its test split only reports: chosen on agreement with "
                "PyTorch, no labels")
    return "no labelled images (a catalog model without --data)"


def _score(c: _Candidate, got: np.ndarray, ref: _Reference, max_drop: float) -> None:
    """Set the candidate's parity with PyTorch and, on labelled images, its accuracy."""
    c.parity = _parity(c.precision, got, ref.logits, ref.labelled, max_drop, ref.inputs)
    if ref.labelled:
        acc = top1(got, ref.labels)
        c.accuracy = {"fp32_top1": round(ref.fp32_top1, 4), "top1": round(acc, 4),
                      "top1_agreement": round(c.parity["top1_agreement"], 6),
                      "drop_pts": round(ref.fp32_top1 - acc, 4), "images": len(ref.logits)}


def _eval_batches(src: _Source, calib: tuple[list[Record], str] | None,
                  say: Callable[[str], None]) -> tuple[Any, bool]:
    """Labelled evaluation images if there are any; else calibration images, else random inputs."""
    if src.eval_set is not None and len(src.eval_set):
        say(f"evaluating on {len(src.eval_set)} images ({src.eval_set.source})")
        return image_batches(src.eval_set.records, src.preprocess, src.resolution), True
    if calib is not None:
        say(f"checking agreement with PyTorch on {len(calib[0])} calibration images (no labelled images)")
        return ((x, np.full(len(x), -1)) for x, _ in image_batches(calib[0], src.preprocess, src.resolution)), False
    say("checking parity on random inputs (no labelled images)")
    return random_batches(src.resolution), False


def _all_logits(src: _Source, candidates: list[_Candidate], threads: int | None,
                batches: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The logits of PyTorch and of every candidate on the same batches."""
    import torch  # deferred: torch is heavy, and only the evaluation step runs the PyTorch model

    def torch_fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return src.model(torch.from_numpy(x)).float().numpy()

    runners = {c.precision: OnnxRuntimeRunner(c.path, providers="cpu", threads=threads, name=c.precision)
               for c in candidates}
    for runner in runners.values():
        runner.activate()
    try:
        models: dict[str, Callable[[np.ndarray], np.ndarray]] = {"torch": torch_fn}
        for name, runner in runners.items():
            models[name] = lambda x, r=runner: r.infer(x)["logits"]
        return collect_logits(batches, models)
    finally:
        for runner in runners.values():
            runner.deactivate()


def _parity(precision: str, got: np.ndarray, ref: np.ndarray, labelled: bool, max_drop: float,
            inputs: str) -> dict[str, Any]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    agree = agreement(got, ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if precision == "fp32":
        atol, need_agree = FP32_ATOL, 1.0
    elif precision == "fp16":
        atol, need_agree = FP16_ATOL + FP16_RTOL * scale, None
    elif labelled:
        atol, need_agree = None, None  # judged on its measured accuracy drop
    else:
        # No labels: a drop of d points needs at least d% of the images to disagree with FP32, so
        # agreement >= 1 - budget/100 keeps INT8 within the accuracy budget.
        atol, need_agree = None, 1.0 - max_drop / 100.0
    passed = (atol is None or float(diff.max()) <= atol) and (need_agree is None or agree >= need_agree)
    return {
        "images": len(ref),
        "inputs": inputs,
        "min_top1_agreement": need_agree,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": agree,
        "atol": atol,
        "passed": passed,
    }


def timed_runs(rounds: int) -> int:
    """The runs each candidate is timed for ``--rounds``: blocks of 3 (see :func:`_measure`), at least one."""
    return 3 * max(1, -(-rounds // 3))


def _measure(candidates: list[_Candidate], resolution: int, threads: int | None, rounds: int,
             say: Callable[[str], None]) -> None:
    """Time the candidates against each other, interleaved so load on a shared machine hits them all alike.

    This compares candidates (which precision is fastest here); it is not a deployment latency, which is a
    steady state (:func:`edgetl.runtime.bench.benchmark`, as validate and the TensorRT engine are timed).
    """
    live = [c for c in candidates if c.rejected is None or c.precision == "fp32"]
    say(f"timing {', '.join(c.precision for c in live)} on this machine ({rounds} interleaved runs each)")
    runners = {c.precision: OnnxRuntimeRunner(c.path, providers="cpu", threads=threads, name=c.precision)
               for c in live}
    # Blocks of 3 timed runs per candidate and round, after an untimed one: the idle thread pool of the
    # session timed just before still spins for a moment and would tax the first run after it.
    results = benchmark_interleaved(runners, (1, 3, resolution, resolution), rounds=timed_runs(rounds) // 3,
                                    iterations_per_round=3, warmup=3, settle=1)
    for c in live:
        c.latency = budget.latency_stats(results[c.precision])


def _rejection(c: _Candidate, max_drop: float) -> str | None:
    """Why the candidate is not within the accuracy budget, or None when it is."""
    if c.parity and not c.parity["passed"] and c.precision != "fp32":
        p = c.parity
        if p["atol"] is not None and p["max_abs_diff"] > p["atol"]:
            return f"parity with PyTorch failed (max |diff| {p['max_abs_diff']:.3g} > {p['atol']:.3g})"
        return (f"top-1 agreement with PyTorch {100 * p['top1_agreement']:.1f}% on {p['inputs']} < "
                f"{100 * p['min_top1_agreement']:.1f}% (no labels: agreement bounds the drop)")
    if c.accuracy and c.accuracy["drop_pts"] > max_drop:
        return f"accuracy drop {c.accuracy['drop_pts']:.2f} pts > budget {max_drop:g} pts"
    return None


def _rank_by(profile: DeviceProfile, candidates: list[_Candidate]) -> str:
    """``measured`` when the candidates are timed on the target itself (ONNX Runtime on the device),
    else ``predicted`` (the target's prediction, which knows what its ISA does with INT8); ``measured``
    again, with a note in the manifest, when some candidate has no prediction."""
    if budget.on_target(profile, "onnxruntime"):
        return "measured"
    return "predicted" if all(c.predicted_ms is not None for c in candidates) else "host"


def _stats(by: str) -> tuple[str, ...]:
    """The latency statistics a lower precision must win on by :data:`SPEED_MARGIN`: a prediction has one."""
    return ("min",) if by == "predicted" else ("min", "p25")


def _choose(candidates: list[_Candidate], rank_by: str, max_drop: float) -> _Candidate:
    """Walk the candidates from the highest precision down: one within the accuracy budget replaces the pick
    when it :meth:`~_Candidate.beats` it. Each candidate not shipped is told what decided it, with the figures."""
    for c in candidates:
        c.rejected, c.note = _rejection(c, max_drop), None
    best = candidates[0]
    margin = f"{100 * SPEED_MARGIN:.0f}%"
    for c in candidates[1:]:
        if c.rejected is not None:
            continue
        if c.beats(best, rank_by):
            best.note = f"{c.precision} is at least {margin} faster ({c.versus(best, rank_by)})"
            best = c
        elif c.rank_latency(rank_by) > best.rank_latency(rank_by):
            c.note = f"slower than {best.precision} ({c.versus(best, rank_by)})"
        else:
            both = "" if rank_by == "predicted" else " on both min and p25"
            c.note = (f"not faster than {best.precision} by the required {margin}{both} "
                      f"({c.versus(best, rank_by)})")
    best.chosen = True
    return best


# --- the API -------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One export: the options, the target and where the artifact goes."""

    opts: ExportOptions
    inputs: dict[type, Any]
    profile: DeviceProfile
    out_path: Path
    progress: Callable[[str], None] | None
    threads: int | None = None
    rank_by: str = "measured"
    skipped: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def say(self, message: str) -> None:
        log.info(message)
        if self.progress is not None:
            self.progress(message)

    @property
    def wanted(self) -> list[str]:
        """The precisions to build: the one asked for, or under auto every one the device runs."""
        if self.opts.precision != "auto":
            return [self.opts.precision]
        fp16 = ["fp16"] if _fast_fp16(self.profile) else []
        return ["fp32", *fp16, *(["int8"] if self.profile.supports("int8") else [])]



@dataclass
class _Verdict:
    """The shipped candidate judged against the budgets."""

    accuracy: dict[str, Any]
    latency: dict[str, Any]
    here: bool
    failures: list[str]


@documented(ExportOptions, "export")
def export(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    force: bool = False,
    check: bool = True,
    candidates_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> Artifact:
    """Export a fine-tuned run (or a catalog classifier) to an artifact folder.

    Args:
        source: the ``--out`` folder of ``edgetl finetune``, or a catalog name together with ``weights``.
        out: the artifact folder to write.
        options: how to build and judge it (:class:`~edgetl.options.ExportOptions`); its fields may also
            be given as keyword arguments (``export(run, out, precision="int8")``).
        data: a folder of class folders to measure accuracy on, instead of the run's validation split.
        force: replace an existing ``out`` (swapped atomically).
        check: raise :class:`BudgetExceededError` when a budget is missed (after writing the artifact).
        candidates_dir: also copy every candidate's ONNX file here (``fp32.onnx``, ``int8.onnx``...), outside
            the artifact, e.g. to compare them (``tools/bench/export_speed.py`` does).
        progress: called with a short message at each step.
        **kwargs: fields of :class:`~edgetl.options.ExportOptions` and of the shared inputs export takes
            (:data:`~edgetl.options.STAGE_INPUTS`): ``device`` (the target profile: a name, an alias or a YAML
            path; default: :func:`~edgetl.device.profiles.default_device`), ``threads``; for a catalog name
            ``weights`` (``imagenet``, a state_dict PATH, or ``none``: random, for timing), ``weights_dir``
            and ``resolution`` (default: its own; a run keeps its training size).

    Returns:
        The :class:`Artifact`.

    Raises:
        BudgetExceededError: (with ``check``) a budget was missed; the artifact is written and its
            manifest says so. The exception's ``artifact`` attribute holds the :class:`Artifact`.
        ExportError, ConfigError, CheckpointError, DataError, ProfileError, BackendUnavailableError:
            the export failed; nothing is left at ``out`` (an existing folder is left intact).
    """
    (opts,), inputs = take_inputs("export", kwargs, (ExportOptions, options))
    job = _start(source, out, opts, inputs, data, force, progress)
    signer = signing.load_signer(opts.sign_key)  # a bad key fails before any work
    job.say("loading the model")
    given = inputs[SourceOptions]
    src = _load_source(source, given.weights, given.weights_dir, given.resolution, data)
    if opts.tensorrt:
        _require_tensorrt(job, src)
    with bundle.staging_dir(job.out_path) as stage:
        work = stage / ".work"
        work.mkdir()
        onnx_report, candidates, evaluation = _candidates(job, src, work)
        chosen = _decide(job, src, candidates)
        engine_info = _engine(job, src, stage, candidates, chosen)
        verdict = _judge(job, chosen, evaluation, engine_info)
        verdict.accuracy.update(_report_on_test(job, src, candidates[0], chosen))
        job.say("writing the artifact")
        manifest = _write_artifact(job, src, stage, onnx_report, candidates, chosen, verdict, engine_info)
        manifest["golden"] = _golden(job, src, stage, chosen.precision)
        for c in candidates if candidates_dir is not None else ():
            bundle.copy_file(c.path, Path(candidates_dir) / f"{c.precision}.onnx")
        shutil.rmtree(work)
        manifest = bundle.write_manifest(stage, {**manifest, "integrity": signing.integrity(signer)})
        signing.sign_manifest(stage, signer)
        bundle.publish(stage, job.out_path, force)
    return _finish(job, manifest, chosen, verdict, check)


def _start(source: str | os.PathLike[str], out: str | os.PathLike[str], opts: ExportOptions, inputs: dict[type, Any],
           data: str | os.PathLike[str] | None, force: bool, progress: Callable[[str], None] | None) -> _Job:
    """Check everything that can be checked before any work: options, device, destination."""
    quantize.check_exclude(opts.exclude_op_types)
    if opts.max_latency_ms is not None:
        budget.check_metric(opts.budget_metric, timed_runs(opts.rounds), "--rounds")
    profile = load_profile(inputs[TargetOptions].device or default_device())
    if opts.precision != "auto":
        profile.check_precision(opts.precision)
    bundle.check_not_inside(Path(out), {"the run": source if _is_run_dir(source) else None, "--data": data,
                                        "--calib-data": opts.calibration.data, "--sign-key": opts.sign_key})
    out_path = bundle.check_destination(out, force)
    return _Job(opts, inputs, profile, out_path, progress,
                threads=cap_threads(threads_for(profile, inputs[TargetOptions].threads)))


def _require_tensorrt(job: _Job, src: _Source) -> None:
    precision = job.opts.precision
    guess = precision if precision != "auto" else ("fp16" if "fp16" in job.profile.precisions else "fp32")
    require_tensorrt(guess, src.resolution, job.out_path)


def _candidates(job: _Job, src: _Source, work: Path) -> tuple[Any, list[_Candidate], dict[str, Any]]:
    """Export FP32 ONNX, build the other precisions, and check them all against PyTorch."""
    opts = job.opts
    calib = _calibration(src, opts.calibration.data, opts.calibration.size, opts.seed) if "int8" in job.wanted \
        else None
    job.say(f"exporting {src.card.name} to ONNX (opset {opts.opset})")
    onnx_report = export_onnx(src.model, work / "fp32.onnx", resolution=src.resolution, opset=opts.opset,
                              dynamic_batch=True, check=True, simplify=opts.simplify)
    candidates = _build_candidates(src, onnx_report.path, work, job, calib)
    evaluation, ref = _evaluate(src, candidates, job.threads, opts.max_accuracy_drop, calib, job.say)
    _control_accuracy(job, src, candidates, calib, ref)
    _require_parity(candidates, opts.precision)
    if opts.precision != "auto":
        candidates = [c for c in candidates if c.precision in ("fp32", opts.precision)]
    return onnx_report, candidates, evaluation


def _control_accuracy(job: _Job, src: _Source, candidates: list[_Candidate],
                      calib: tuple[list[Record], str] | None, ref: _Reference) -> None:
    """When static INT8 misses the accuracy budget, keep its most sensitive layers in float
    (:mod:`edgetl.export.accuracy_control`); the result replaces the INT8 candidate and is timed like it."""
    max_drop = job.opts.max_accuracy_drop
    i, int8 = next(((i, c) for i, c in enumerate(candidates) if c.precision == "int8"), (None, None))
    if int8 is None or int8.mode != "static" or calib is None or _rejection(int8, max_drop) is None:
        return
    layers = quantize.quantized_layers(int8.path)
    job.say(f"INT8 misses the accuracy budget: ranking its {len(layers)} quantized layers by sensitivity")
    fp32_path, method = candidates[0].path, int8.quant["calib_method"]
    probe = list(ImageBatches(calib[0][:SENSITIVITY_IMAGES], src.preprocess, src.resolution, CALIB_BATCH))
    fp32_probe = _onnx_logits(fp32_path, ((x, np.zeros(len(x))) for x in probe), job.threads)
    tried: dict[tuple[str, ...], _Candidate] = {}
    evaluation = list(_eval_batches(src, calib, lambda _: None)[0])  # decoded once for every try below

    def error_with_float(kept: list[str]) -> float:
        path = _quantize_static(job, fp32_path, fp32_path.parent / "int8-probe.onnx", [], method, kept).path
        return relative_error(_onnx_logits(path, ((x, np.zeros(len(x))) for x in probe), job.threads), fp32_probe)

    def passes(kept: list[str]) -> bool:
        dst = fp32_path.parent / f"int8-float{len(tried)}.onnx"
        report = _quantize_static(job, fp32_path, dst, [], method, kept)
        c = _Candidate("int8", dst, "static", quant={**int8.quant, "kept_in_float": kept,
                                                     "op_counts": report.op_counts, "file_bytes": report.file_bytes})
        _score(c, _onnx_logits(dst, evaluation, job.threads), ref, max_drop)
        tried[tuple(kept)] = c
        return _rejection(c, max_drop) is None

    result = control_accuracy(layers, error_with_float, passes)
    if result.passed:
        candidates[i] = tried[tuple(result.kept_in_float)]
        job.say(f"INT8 within budget with {len(result.kept_in_float)} of {len(layers)} layers in float")
    candidates[i].quant = {**candidates[i].quant, "accuracy_control": result.to_dict()}


def _report_on_test(job: _Job, src: _Source, fp32: _Candidate, chosen: _Candidate) -> dict[str, Any]:
    """The shipped model's and FP32's top-1 on the run's test split, which chose nothing: with the count,
    the 95% Wilson interval, per class, and the drop (per class too, the worst class named)."""
    test = run_split_set(src.description["run_dir"], "test") if src.kind == "run" else None
    if test is None:
        return {"reported_on": None, "test": None}
    job.say(f"reporting on {len(test)} test images ({test.source})")
    batches = image_batches(test.records, src.preprocess, src.resolution)
    with OnnxRuntimeRunner(fp32.path, providers="cpu", threads=job.threads) as ref, \
            OnnxRuntimeRunner(chosen.path, providers="cpu", threads=job.threads) as shipped:
        logits, labels = collect_logits(batches, {"fp32": lambda x: ref.infer(x)["logits"],
                                                  "artifact": lambda x: shipped.infer(x)["logits"]})
    report = drop_report(logits["fp32"], logits["artifact"], labels, src.classes, test.source)
    return {"reported_on": test.source, "test": {"precision": chosen.precision, **report}}


def _onnx_logits(path: Path, batches: Any, threads: int | None) -> np.ndarray:
    """The model's logits on ``(images, labels)`` batches, with ONNX Runtime on the CPU."""
    with OnnxRuntimeRunner(path, providers="cpu", threads=threads) as runner:
        logits, _ = collect_logits(batches, {"m": lambda x: runner.infer(x)["logits"]})
    return logits["m"]


def _require_parity(candidates: list[_Candidate], precision: str) -> None:
    fp32 = candidates[0]
    if not fp32.parity["passed"]:
        p = fp32.parity
        raise ExportError(
            f"the FP32 ONNX model does not reproduce PyTorch: max |diff| {p['max_abs_diff']:.3g} "
            f"(limit {FP32_ATOL:g}), top-1 agreement {100 * p['top1_agreement']:.1f}% (need 100%)"
        )
    last = candidates[-1]
    if precision == "fp16" and last.precision == "fp16" and not last.parity["passed"]:
        raise ExportError(
            f"the FP16 model differs from PyTorch by {last.parity['max_abs_diff']:.3g} (> {last.parity['atol']:.3g}); "
            "export in fp32 or int8"
        )


def _decide(job: _Job, src: _Source, candidates: list[_Candidate]) -> _Candidate:
    """Predict and time every candidate, then pick the one to ship."""
    for c in candidates:
        # the figure validate predicts for the artifact: layers kept in float are read from the same record
        c.predicted_ms = budget.shipped_predicted_ms(src.card, src.resolution, job.profile, c.precision, c.quant)
    job.rank_by = _rank_by(job.profile, candidates)
    _measure(candidates, src.resolution, job.threads, job.opts.rounds, job.say)
    if job.opts.precision == "auto":
        return _choose(candidates, job.rank_by, job.opts.max_accuracy_drop)
    chosen = next(c for c in candidates if c.precision == job.opts.precision)
    chosen.chosen = True
    for c in candidates:
        if not c.chosen:
            c.note = "reference (not shipped)"
    return chosen


def _judge(job: _Job, chosen: _Candidate, evaluation: dict[str, Any], engine_info: dict[str, Any] | None) -> _Verdict:
    """The accuracy and latency sections of the manifest, and the budgets they miss."""
    max_drop = job.opts.max_accuracy_drop
    accuracy = _accuracy_section(chosen, evaluation, max_drop)
    failures: list[str] = []
    if accuracy.get("pass") is False and not accuracy["measured"]:
        failures.append(
            f"{chosen.precision} agrees with PyTorch on {100 * accuracy['top1_agreement']:.1f}% of the "
            f"{accuracy['inputs']}, below the {100 * accuracy['min_top1_agreement']:.1f}% that keeps the drop "
            f"within {max_drop:g} pts; pass --data DIR to measure the drop itself"
        )
    elif accuracy.get("pass") is False:
        failures.append(
            f"accuracy drop {accuracy['drop_pts']:.2f} pts (fp32 {accuracy['fp32_top1']:.2f}% -> "
            f"{chosen.precision} {accuracy['top1']:.2f}%) exceeds the budget of {max_drop:g} pts"
        )
    here = job.profile.is_this_machine()
    latency = _latency_section(chosen, job, engine_info)
    failure = latency.pop("failure")
    if failure:
        failures.append(failure)
    return _Verdict(accuracy, latency, here, failures)


def _engine(job: _Job, src: _Source, stage: Path, candidates: list[_Candidate],
            chosen: _Candidate) -> dict[str, Any] | None:
    """With ``--tensorrt``: build ``model.engine`` into ``stage``, check its outputs against FP32 (an engine
    that disagrees is not shipped), and time it; its latency is the one on the device when this is it."""
    if not job.opts.tensorrt:
        return None
    eng_precision = engine_precision(chosen.precision, chosen.mode, list(job.profile.precisions))
    job.say(f"building a {eng_precision} TensorRT engine (minutes)")
    onnx_for_engine = chosen.path if eng_precision == "int8" else candidates[0].path
    engine = stage / bundle.ENGINE_FILE
    info = build_tensorrt_engine(onnx_for_engine, engine, eng_precision)
    with TensorRTRunner(engine, name="tensorrt") as runner:
        info["check"] = _check_engine(job, src, runner, candidates[0].path)
        result = benchmark(runner, shape=(1, 3, src.resolution, src.resolution), iterations=max(job.opts.rounds, 100))
    info["latency"] = budget.latency_stats(result)
    return info


def _check_engine(job: _Job, src: _Source, runner: Any, fp32_path: Path) -> dict[str, Any]:
    """Top-1 agreement of the engine with the FP32 ONNX model on the evaluation images (random inputs
    without them); below ``1 - max_drop/100`` the engine is refused, as an unlabelled INT8 model is."""
    batches, labelled = _eval_batches(src, None, job.say)

    def engine_fn(x: np.ndarray) -> np.ndarray:  # the engine's profile takes batches of up to 8
        return np.concatenate([runner.infer(x[i:i + 8])["logits"] for i in range(0, len(x), 8)])

    with OnnxRuntimeRunner(fp32_path, providers="cpu", threads=job.threads) as fp32:
        logits, _ = collect_logits(batches, {"engine": engine_fn, "fp32": lambda x: fp32.infer(x)["logits"]})
    agree, need = agreement(logits["engine"], logits["fp32"]), 1.0 - job.opts.max_accuracy_drop / 100.0
    diff = float(np.abs(logits["engine"].astype(np.float64) - logits["fp32"]).max())
    inputs = "evaluation images" if labelled else "random normal inputs"
    if agree < need:
        raise ExportError(f"the TensorRT engine agrees with the FP32 model on {100 * agree:.1f}% of the {inputs}, "
                          f"below {100 * need:.1f}%; not shipping it (export without --tensorrt, or a higher "
                          "precision)")
    return {"top1_agreement_with_fp32": agree, "min_top1_agreement": need, "max_abs_diff": diff,
            "images": len(logits["fp32"]), "inputs": inputs}


def _write_artifact(job: _Job, src: _Source, stage: Path, onnx_report: Any, candidates: list[_Candidate],
                    chosen: _Candidate, verdict: _Verdict, engine_info: dict[str, Any] | None) -> dict[str, Any]:
    """Write the model, labels, preprocessing and header into ``stage`` (the engine is there already);
    return the manifest."""
    bundle.copy_file(chosen.path, stage / bundle.MODEL_FILE)
    bundle.write_labels(stage, src.classes)
    bundle.write_preprocess(stage, src.preprocess, src.resolution)
    if job.opts.c_header:
        bundle.write_c_header(stage, stage / bundle.MODEL_FILE, onnx_report.input_shapes["input"],
                              onnx_report.output_shapes["logits"], len(src.classes), chosen.precision, src.card.name)
    return _manifest(job, src, onnx_report, candidates, chosen, verdict, engine_info)


def _golden(job: _Job, src: _Source, stage: Path, precision: str) -> dict[str, Any]:
    """Write the golden inputs and ``model.onnx``'s outputs on them (:mod:`edgetl.export.golden`), with ONNX
    Runtime on the CPU as export measured; a seeded, stratified few of the evaluation images, or synthetic ones."""
    records = stratified_sample(src.eval_set.records, 2 * golden.MAX_INPUTS, job.opts.seed) if src.eval_set else []
    spec = PreprocessSpec.from_preprocess(src.preprocess, src.resolution)
    with OnnxRuntimeRunner(stage / bundle.MODEL_FILE, providers="cpu", threads=job.threads) as runner:
        return golden.write_golden(stage, spec, lambda x: runner.infer(x)["logits"], precision,
                                   [path for path, _ in records], src.eval_set.source if src.eval_set else "")


def _manifest(job: _Job, src: _Source, onnx_report: Any, candidates: list[_Candidate], chosen: _Candidate,
              verdict: _Verdict, engine_info: dict[str, Any] | None) -> dict[str, Any]:
    precision, profile = job.opts.precision, job.profile
    return {
        "format": bundle.ARTIFACT_FORMAT,
        "version": bundle.ARTIFACT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {**package_versions(), "tensorrt": engine_info["tensorrt_version"] if engine_info else None},
        "source": {**src.description, "resolution": src.resolution, "num_classes": len(src.classes)},
        "precision": chosen.precision,
        "requested_precision": precision,
        "onnx": _onnx_section(onnx_report, chosen),
        "quantization": chosen.quant,
        "device": {
            "name": profile.name,
            "runtime": profile.runtime,
            "precisions": list(profile.precisions),
            "this_machine": verdict.here,
            "reduce_range": _reduce_range(profile) if chosen.precision == "int8" else None,
        },
        "parity": chosen.parity,
        "accuracy": verdict.accuracy,
        "latency": verdict.latency,
        "candidates": [c.to_dict() for c in candidates],
        "selection": {
            "rule": ("fastest candidate within the accuracy budget; a lower precision must be at least "
                     f"{100 * SPEED_MARGIN:.0f}% faster on both the minimum and the 25th percentile")
            if precision == "auto" else f"precision {precision} was requested",
            "ranked_on": _ranked_on(job),
            "skipped": job.skipped,
        },
        "tensorrt": engine_info,
        "status": "failed" if verdict.failures else "passed",
        "failures": verdict.failures,
        "export_seconds": round(time.perf_counter() - job.start, 2),
    }


def _ranked_on(job: _Job) -> str:
    profile = job.profile
    if job.rank_by == "measured":
        return f"min and p25 latency measured on {profile.name} (this machine)"
    if job.rank_by == "predicted":
        return (f"latency predicted for {profile.name} (this machine is not it); the timings here are "
                "for information only")
    return f"min and p25 latency measured here: no prediction for {profile.name} (the model cannot be traced)"


def _onnx_section(onnx_report: Any, chosen: _Candidate) -> dict[str, Any]:
    return {
        "opset": onnx_report.opset,
        "exporter": onnx_report.exporter,
        "nodes_before_simplify": onnx_report.nodes_exported,
        "nodes_after_simplify": onnx_report.nodes,
        "simplified": onnx_report.simplified,
        "simplify_error": onnx_report.simplify_error,
        "input": {"name": "input", "shape": onnx_report.input_shapes["input"], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": onnx_report.output_shapes["logits"], "dtype": "float32"},
        "dynamic_batch": onnx_report.dynamic_batch,
        "nodes": sum(chosen.quant["op_counts"].values()) if chosen.quant else onnx_report.nodes,
    }


def _finish(job: _Job, manifest: dict[str, Any], chosen: _Candidate, verdict: _Verdict, check: bool) -> Artifact:
    artifact = Artifact(
        path=job.out_path, manifest=manifest, precision=chosen.precision, accuracy=verdict.accuracy,
        latency=verdict.latency, candidates=manifest["candidates"], failures=verdict.failures,
    )
    log.info("wrote %s (%s) in %.1f s", job.out_path, chosen.precision, time.perf_counter() - job.start)
    if verdict.failures and check:
        error = BudgetExceededError(
            f"{'; '.join(verdict.failures)}; the artifact is written to {job.out_path} for inspection")
        error.artifact = artifact  # type: ignore[attr-defined]
        raise error
    return artifact


def _accuracy_section(chosen: _Candidate, evaluation: dict[str, Any], max_drop: float) -> dict[str, Any]:
    if not evaluation["measured"]:
        need = chosen.parity.get("min_top1_agreement")
        return {
            "measured": False,
            "reason": f"{evaluation['unlabelled_reason']}: top-1 agreement with PyTorch on "
                      f"{chosen.parity['inputs']} only",
            "chosen_on": evaluation["chosen_on"],
            "top1_agreement": chosen.parity["top1_agreement"],
            "inputs": chosen.parity["inputs"],
            "min_top1_agreement": need,
            "max_drop_pts": max_drop,
            "pass": None if need is None else bool(chosen.parity["top1_agreement"] >= need),
        }
    acc = dict(chosen.accuracy or {})
    return {
        "measured": True,
        "source": evaluation["source"],
        "chosen_on": evaluation["chosen_on"],
        **acc,
        "max_drop_pts": max_drop,
        "pass": acc["drop_pts"] <= max_drop,
    }


def _latency_section(chosen: _Candidate, job: _Job, engine_info: dict[str, Any] | None) -> dict[str, Any]:
    """The shipped candidate's latency (its engine's, when one was built), judged by the one budget rule
    (:func:`edgetl.device.budget.judge_latency`) on ``--budget-metric``, which the section records for validate."""
    profile, threads = job.profile, job.threads
    runtime = "tensorrt" if engine_info else "onnxruntime"
    lat = engine_info["latency"] if engine_info else (chosen.latency or {})
    verdict = budget.judge_latency(profile, runtime, lat, chosen.predicted_ms, job.opts.max_latency_ms,
                                   job.opts.budget_metric)
    return {
        "device": profile.name,
        "runtime": profile.runtime,
        "measured_on": "this machine",
        "measured_with": "tensorrt (model.engine)" if engine_info else "onnxruntime CPUExecutionProvider",
        "threads": threads,
        "batch": 1,
        **lat,
        "predicted_ms": None if chosen.predicted_ms is None else round(chosen.predicted_ms, 4),
        "predicted_for": profile.name,
        **verdict,
    }
