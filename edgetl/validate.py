"""``validate()``: verify an artifact folder, then measure its latency (and accuracy) against budgets.

Order of the checks:

1. **Hashes first.** Every file the manifest lists must exist and match its sha256; a missing or
   changed file is an :class:`~edgetl.errors.ArtifactError` (exit 1), e.g.
   ``sha256 mismatch for model.onnx``, and so is a file the manifest does not list (added after
   export, so unverified). ``validation.json`` is not hashed: validate writes it. Links, subfolders
   and hidden files are refused, and the manifest must match its digest (``manifest.sha256``).
   With ``verify_key``, the signature over the manifest is checked before anything else
   (:mod:`edgetl.export.signing`); without, the report says how the artifact is protected
   (``checksummed, not signed``, or signed but not verified).
   Then the files must agree (:mod:`edgetl.export.consistency`): as many outputs as labels, the
   precision claimed is the graph's, the input shape is preprocess.json's.
   **Golden outputs** next (:mod:`edgetl.export.golden`): the stored images prepared with preprocess.json must
   give export's inputs, and the device's runtime must reproduce export's outputs on them within the
   precision's tolerance, before anything is timed; a divergence is an ArtifactError (exit 1) naming the
   largest difference. An artifact made before golden outputs existed gets a note and goes on.
2. **Latency**, measured here with the runtime the device profile names: ONNX Runtime (CPU) for CPU
   profiles, TensorRT (``model.engine``) where TensorRT and a GPU exist, else ONNX Runtime with a
   note. When the profile is not this machine, the report says so and shows the latency predicted
   on that device (from the source architecture's cost trace) next to the measurement here.
3. **Accuracy** on ``data`` (a folder of class folders named like ``labels.json``), or on a split of ``run``
   (``split``, default ``test``, read from the run's ``splits.json``), when given: top-1 with its count, 95%
   Wilson interval and per-class top-1.
4. **Budgets:** ``max_latency_ms`` (judged on the measurement on the device itself, at ``budget_metric``:
   by default the one the artifact was exported with; on the device's predicted latency elsewhere, the
   figure export predicted) and ``max_memory_mb`` (default: the profile's model memory budget).
   A miss raises :class:`~edgetl.errors.BudgetExceededError` (exit 3) naming the value and the
   budget, after the report is written to ``validation.json``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgetl._io import atomic_write_json
from edgetl.board.jobs import MEMORY_RUNS, Remote, validate_on_board
from edgetl.data.preprocess import read_spec
from edgetl.device import budget
from edgetl.device.profiles import DeviceProfile, default_device, load_profile, threads_for
from edgetl.errors import BudgetExceededError, ConfigError, ProfileError
from edgetl.export import bundle, golden, signing
from edgetl.export.consistency import check_consistency
from edgetl.options import TargetOptions, ValidateOptions, cap_threads, documented, take_inputs
from edgetl.runtime.bench import benchmark, peak_rss_mb, reset_peak_rss, session_rss_mb
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.runtime.tensorrt import TensorRTRunner, tensorrt_available

log = logging.getLogger(__name__)

ENGINE_BATCH = 8
"""Images per batch when measuring accuracy: at most the largest batch of an edgetl engine's profile."""



@dataclass
class ValidationReport:
    """The result of :func:`validate`.

    Attributes:
        artifact: the artifact folder.
        device: the profile's name; ``runtime`` the runtime that measured here.
        this_machine: whether the profile describes this machine.
        hashes_ok: every file matched its sha256 (always True in a returned report: a mismatch raises).
        latency: measured statistics (ms), the prediction on the device, and the budget verdict.
        memory: the runtime's peak resident memory for the model (``runtime_mb``), how it was measured
            (``measured``), the model file's size and the budget.
        accuracy: top-1 on ``data`` or on a split of ``run`` (None without either), with its count, 95% Wilson
            interval and per-class top-1.
        failures: the budgets that were missed, one sentence each.
        notes: things the reader should know (another device, a fallback runtime).
        integrity: how the artifact is protected: ``status`` (``signed`` or ``checksummed, not signed``),
            ``verified`` (its signature was checked with a public key), the key's fingerprint and a ``summary``.
        golden: the golden check (:func:`edgetl.export.golden.check`): ``status`` ``passed`` (with the largest
            difference and the tolerance) or ``absent`` (with a note).
    """

    artifact: Path
    device: str
    runtime: str
    this_machine: bool
    precision: str
    hashes_ok: bool
    files: dict[str, str]
    latency: dict[str, Any]
    memory: dict[str, Any]
    accuracy: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    integrity: dict[str, Any] = field(default_factory=lambda: {"summary": signing.NOT_SIGNED})
    golden: dict[str, Any] = field(default_factory=lambda: {"status": "not checked"})
    board: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": str(self.artifact),
            "created": self.created,
            "device": self.device,
            "runtime": self.runtime,
            "this_machine": self.this_machine,
            "precision": self.precision,
            "hashes_ok": self.hashes_ok,
            "integrity": dict(self.integrity),
            "golden": dict(self.golden),
            "files": self.files,
            "latency": self.latency,
            "memory": self.memory,
            "accuracy": self.accuracy,
            "passed": self.passed,
            "failures": list(self.failures),
            "notes": list(self.notes),
            **({"board": self.board} if self.board is not None else {}),
        }

    def raise_for_budget(self) -> None:
        """Raise :class:`BudgetExceededError` (exit 3) if a budget was missed."""
        if self.failures:
            raise BudgetExceededError("; ".join(self.failures))


def _vm_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _runner(folder: Path, runtime: str, threads: int | None, files: dict[str, str]) -> tuple[Any, str, list[str]]:
    """The runner for the profile's runtime, falling back to ONNX Runtime CPU where TensorRT is missing.

    Only files the manifest lists (and whose hashes were checked) are run.
    """
    notes: list[str] = []
    if runtime == "tensorrt":
        engine = folder / bundle.ENGINE_FILE
        if tensorrt_available() and bundle.ENGINE_FILE in files:
            return TensorRTRunner(engine, name="tensorrt"), "tensorrt", notes
        why = "no model.engine in the artifact" if tensorrt_available() else "TensorRT is not available here"
        notes.append(f"the device runs TensorRT, but {why}: measured with ONNX Runtime on the CPU instead")
    runner = OnnxRuntimeRunner(folder / bundle.MODEL_FILE, providers="cpu", threads=threads, name="onnxruntime")
    return runner, "onnxruntime", notes


def _scoring_set(folder: Path, opts: ValidateOptions) -> Any:
    """The labelled images to measure top-1 on: ``data``, a split of ``run``, or None (no accuracy)."""
    # deferred: the image pipeline imports torch, which timing an artifact on the device does not need
    from edgetl.export.evaluate import folder_eval_set, run_scoring_set

    if opts.run is not None and opts.data is not None:
        raise ConfigError("pass --data DIR or --run RUN (with --split), not both")
    if opts.run is None and opts.split is not None:
        raise ConfigError("--split picks a split of a run folder: pass --run RUN too")
    if opts.run is None and opts.data is None:
        return None
    classes = bundle.read_labels(folder)
    if opts.run is not None:
        return run_scoring_set(opts.run, opts.split or "test", classes)
    return folder_eval_set(opts.data, classes)


def _accuracy(folder: Path, eval_set: Any, runner_threads: int | None, runner: Any,
              runtime: str) -> dict[str, Any]:
    """Top-1 on ``eval_set`` through the runtime that was timed, with its count, 95% Wilson interval and per
    class. With TensorRT, the engine's, and its top-1 agreement with ``model.onnx`` under ONNX Runtime (the
    model export measured the accuracy of)."""
    from edgetl.export.evaluate import agreement, collect_logits, image_batches, split_report, top1

    classes = bundle.read_labels(folder)
    spec = read_spec(folder / bundle.PREPROCESS_FILE)
    batches = image_batches(eval_set.records, spec, batch_size=ENGINE_BATCH)
    with OnnxRuntimeRunner(folder / bundle.MODEL_FILE, providers="cpu", threads=runner_threads) as onnx:
        models = {"onnx": lambda x: onnx.infer(x)["logits"]}
        if runtime != "tensorrt":
            logits, labels = collect_logits(batches, models)
            return {"data": eval_set.source, **split_report(logits["onnx"], labels, classes)}
        with runner:
            logits, labels = collect_logits(batches, {**models, "engine": lambda x: runner.infer(x)["logits"]})
    return {"data": eval_set.source, "runtime": "tensorrt", **split_report(logits["engine"], labels, classes),
            "onnx_top1": round(top1(logits["onnx"], labels), 4),
            "top1_agreement_with_onnx": round(agreement(logits["engine"], logits["onnx"]), 6)}


@documented(ValidateOptions, "validate")
def validate(
    artifact: str | os.PathLike[str],
    device: str | None = None,
    options: ValidateOptions | None = None,
    *,
    write: bool = True,
    check: bool = True,
    **kwargs: Any,
) -> ValidationReport:
    """Verify an artifact's files, measure its latency (and accuracy with ``data``), judge the budgets.

    The latency budget is judged by :func:`edgetl.device.budget.judge_latency`, the rule export uses too: on
    ``budget_metric`` of the measurement on the device itself (a profile of this machine, timed with
    its runtime; by default the metric the artifact was exported with, p50 for an artifact that records
    none); elsewhere on the latency predicted for the device as export predicts it
    (:func:`edgetl.device.budget.shipped_predicted_ms`: INT8 layers kept in float count), when the model
    can be traced (else on the measurement here). So export and validate agree on the same artifact.
    The memory budget defaults to the profile's model memory budget.

    Args:
        artifact: the artifact folder written by ``edgetl export``.
        device: the device profile (default: the one the artifact was exported for).
        options: what to measure and the budgets (:class:`~edgetl.options.ValidateOptions`); its fields
            may also be given as keyword arguments (``validate(folder, max_latency_ms=30)``).
        write: write the report to ``ARTIFACT/validation.json``, or to ``report`` (a field of the options).
        check: raise :class:`BudgetExceededError` when a budget is missed (after writing the report).
        **kwargs: fields of :class:`~edgetl.options.ValidateOptions` and of the shared inputs validate takes
            (:data:`~edgetl.options.STAGE_INPUTS`: ``device``, ``threads``).

    Returns:
        The :class:`ValidationReport`.

    Raises:
        ArtifactError: a missing or tampered file, files that contradict each other, or (with ``verify_key``)
            a missing or invalid signature (checked before anything runs).
        BudgetExceededError: (with ``check``) a budget was missed.
    """
    (opts,), inputs = take_inputs("validate", {"device": device, **kwargs}, (ValidateOptions, options))
    if opts.budget_metric is not None:
        budget.check_metric(opts.budget_metric, opts.iterations, "--iterations")
    folder = Path(artifact).expanduser()
    manifest, integrity = signing.verify_artifact(folder, opts.verify_key)
    check_consistency(folder, manifest)
    metric = _budget_metric(opts, manifest)
    eval_set = _scoring_set(folder, opts)  # a missing split fails before any timing
    files = {name: rec["sha256"] for name, rec in manifest["files"].items()}
    remote = Remote.of(opts)
    profile, here, threads, notes = _target(inputs[TargetOptions], manifest, remote)
    precision = _check_precision(manifest, profile)
    if remote is not None:
        if profile.runtime != remote.runtime:
            notes.append(f"{profile.name} runs {profile.runtime}, and the board was measured with {remote.runtime}"
                         + (" (--runtime tensorrt builds and times a TensorRT engine on the board)"
                            if profile.runtime == "tensorrt" else ""))
        m = _measure_on_board(remote, folder, manifest, opts, threads, eval_set, notes)
    else:
        m = _measure_here(folder, manifest, profile, threads, files, opts, eval_set, notes)
    latency = _latency_verdict(m.result, m.runtime, opts.max_latency_ms, metric, manifest, profile, notes,
                               m.board.get("address") if m.board else None)
    latency.update(runtime=m.runtime, threads=threads, shape=list(m.shape))
    memory = _memory_verdict(m.memory_mb, m.memory_how, folder, opts, profile)
    failures = [f for f in (latency.pop("failure"), memory.pop("failure")) if f]
    report = ValidationReport(
        artifact=folder, device=profile.name, runtime=m.runtime, this_machine=here and remote is None,
        precision=precision, hashes_ok=True, files=files, latency=latency, memory=memory,
        accuracy=m.accuracy, failures=failures, notes=notes, integrity=integrity, golden=m.golden,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), board=m.board,
    )
    if write:
        _write_report(report, folder, opts.report)
    if check:
        report.raise_for_budget()
    return report


@dataclass
class _Measured:
    """What was measured, here or on a board: the runtime, the golden check, the timing and its input shape, the
    session's memory and how it was measured, the accuracy, and the board (None here)."""

    runtime: str
    golden: dict[str, Any]
    result: Any
    shape: tuple[int, ...]
    memory_mb: float | None
    memory_how: str
    accuracy: dict[str, Any] | None
    board: dict[str, Any] | None = None


def _measure_here(folder: Path, manifest: dict[str, Any], profile: DeviceProfile, threads: int | None,
                  files: dict[str, str], opts: ValidateOptions, eval_set: Any, notes: list[str]) -> _Measured:
    """Golden check, timing, memory and accuracy on this machine, with the profile's runtime."""
    runner, runtime, runner_notes = _runner(folder, profile.runtime, threads, files)
    notes += runner_notes
    golden_result = _golden(folder, manifest, runner, runtime, notes)
    result, shape, grown_mb = _time(runner, manifest, opts)
    memory_mb, how = _memory(folder, runtime, threads, shape, grown_mb, notes)
    accuracy = _accuracy(folder, eval_set, threads, runner, runtime) if eval_set is not None else None
    return _Measured(runtime, golden_result, result, shape, memory_mb, how, accuracy)


MEASURED_BOARD = (f"peak RSS of an ONNX Runtime session in a fresh process on the board (load and "
                  f"{MEMORY_RUNS} runs)")


def _measure_on_board(remote: Remote, folder: Path, manifest: dict[str, Any], opts: ValidateOptions,
                      threads: int | None, eval_set: Any, notes: list[str]) -> _Measured:
    """The same measurements made on the board over SSH (:func:`edgetl.board.jobs.validate_on_board`); top-1 is
    scored here on the outputs the board computed."""
    shape = _shape(manifest)
    records = list(eval_set.records) if eval_set is not None else []
    run = validate_on_board(remote, folder, shape, opts.iterations, opts.warmup, threads, [p for p, _ in records])
    if run.golden.get("status") != "passed":
        notes.append(str(run.golden.get("note")))
    if run.memory_mb is None:
        notes.append(f"memory not measured on the board: {run.memory_note}")
    machine, runtime = run.board, remote.runtime
    notes.append(f"measured on the board {remote.on} ({machine['cpu']['model']}, {machine['cpu']['cores']} cores, "
                 f"{machine['os']}, Python {machine['python']}, {runtime} {machine['packages'].get(runtime)}); "
                 f"nearest built-in profile: {machine['nearest_profile']}")
    accuracy = None
    if eval_set is not None:
        from edgetl.export.evaluate import split_report

        labels = np.asarray([y for _, y in records])
        accuracy = {"data": eval_set.source, "runtime": runtime, "on": remote.on,
                    **split_report(np.asarray(run.logits), labels, bundle.read_labels(folder))}
    return _Measured(runtime, run.golden, run.result, tuple(shape), run.memory_mb,
                     MEASURED_BOARD if run.memory_mb is not None else "not measured", accuracy, machine)


def _golden(folder: Path, manifest: dict[str, Any], runner: Any, runtime: str, notes: list[str]) -> dict[str, Any]:
    """Re-run the golden inputs on the runtime that will be timed (:func:`edgetl.export.golden.check`)."""
    with runner:
        result = golden.check(folder, manifest, lambda x: runner.infer(x)["logits"],
                              golden.runtime_precision(manifest, runtime), runtime)
    if result["status"] != "passed":
        notes.append(result["note"])
    return result


def _write_report(report: ValidationReport, folder: Path, target: Path | None) -> None:
    """Write ``validation.json`` to ``target`` (a file, or a folder to hold it), else into the artifact.

    An artifact that cannot be written (read-only media) is validated all the same: the report then says where
    it could not be written, in a warning and a note. An OSError writing ``target`` is raised (the user chose it).
    """
    if target is not None:
        path = Path(target).expanduser()
        atomic_write_json(path / bundle.VALIDATION_FILE if path.is_dir() else path, report.to_dict())
        return
    try:
        atomic_write_json(folder / bundle.VALIDATION_FILE, report.to_dict())
    except OSError as exc:
        note = (f"could not write {folder / bundle.VALIDATION_FILE} ({exc.strerror or exc}); "
                "pass --report PATH to keep the report")
        log.warning("%s", note)
        report.notes.append(note)


def _target(target: TargetOptions, manifest: dict[str, Any], remote: Remote | None = None,
            ) -> tuple[DeviceProfile, bool, int | None, list[str]]:
    """The device profile, whether this machine is it, the threads to time with, and notes for the user (on a
    board: the threads asked for, else all its cores)."""
    profile = load_profile(target.device or manifest.get("device", {}).get("name") or default_device())
    here = profile.is_this_machine()
    if remote is not None:
        return profile, here, target.threads, []
    threads = cap_threads(threads_for(profile, target.threads))
    notes = [] if here else [
        f"'{profile.name}' is not this machine: latency is measured here, and predicted for {profile.name}; "
        "run `edgetl device calibrate` for a profile of this machine"
    ]
    return profile, here, threads, notes


def _check_precision(manifest: dict[str, Any], profile: DeviceProfile) -> str:
    precision = str(manifest.get("precision"))
    if not profile.supports(precision):
        raise ProfileError(
            f"the artifact is {precision}, which {profile.name} does not run (it supports "
            f"{', '.join(profile.precisions)}); export for it with --device {profile.name}"
        )
    return precision


def _shape(manifest: dict[str, Any]) -> tuple[int, int, int, int]:
    """The input timed: one image at the artifact's resolution."""
    resolution = int((manifest.get("source") or {}).get("resolution") or manifest["onnx"]["input"]["shape"][-1])
    return (1, 3, resolution, resolution)


def _time(runner: Any, manifest: dict[str, Any], opts: ValidateOptions) -> tuple[Any, tuple[int, ...], float | None]:
    """Time the model at batch 1 in its steady state (alone, warmed up, consecutive runs: a deployment
    latency, not interleaved); also return how much this process's peak RSS grew meanwhile (see :func:`_memory`)."""
    shape = _shape(manifest)
    rss_before = _vm_rss_mb()
    reset_peak_rss()
    result = benchmark(runner, shape=shape, iterations=opts.iterations, warmup=opts.warmup)
    peak = peak_rss_mb()
    return result, shape, None if rss_before is None else max(peak - rss_before, 0.0)


def _budget_metric(opts: ValidateOptions, manifest: dict[str, Any]) -> str:
    """``--budget-metric``, else the one the artifact was exported with (its latency section), else p50 (an
    artifact that records none); checked against the timed runs before anything runs."""
    if opts.budget_metric is not None:
        return opts.budget_metric
    metric = str((manifest.get("latency") or {}).get("budget_metric") or budget.DEFAULT_METRIC)
    budget.check_metric(metric, opts.iterations, "--iterations", " (the metric the artifact was exported with)")
    return metric


def _latency_verdict(result: Any, runtime: str, budget_ms: float | None, metric: str, manifest: dict[str, Any],
                     profile: DeviceProfile, notes: list[str], board: str | None = None) -> dict[str, Any]:
    """The measurement here and the budget judged by the one rule (:func:`edgetl.device.budget.judge_latency`),
    on the latency export predicted for the artifact (:func:`edgetl.device.budget.shipped_predicted_ms`); measured
    on a ``board``, on that measurement."""
    stats = budget.latency_stats(result)
    on_target = board is not None or budget.on_target(profile, runtime)
    source = manifest.get("source") or {}
    predicted = None if on_target else budget.shipped_predicted_ms(
        source.get("model") or source.get("model_name"), source.get("resolution"), profile,
        str(manifest.get("precision", "fp32")), manifest.get("quantization"))
    verdict = budget.judge_latency(profile, runtime, stats, predicted, budget_ms, metric, measured_on=board)
    if verdict["note"] and verdict["basis"] == "measured here":
        notes.append(verdict["note"])
    return {
        **stats,
        "iterations": result.iterations,
        "predicted_ms": None if predicted is None else round(predicted, 4),
        "predicted_for": None if predicted is None else profile.name,
        **verdict,
    }


FRESH_SESSION_RUNS = 3
MEASURED_FRESH = f"peak RSS of an ONNX Runtime session in a fresh process (load and {FRESH_SESSION_RUNS} runs)"
MEASURED_HERE = "growth of this process's peak RSS while timing"


def _memory(folder: Path, runtime: str, threads: int | None, shape: tuple[int, ...], grown_mb: float | None,
            notes: list[str]) -> tuple[float | None, str]:
    """The memory the runtime takes for the model, and how it was measured.

    An ONNX Runtime session is measured in a fresh process (:func:`edgetl.runtime.bench.session_rss_mb`, as
    calibrate measures the sessions its memory model is fitted on): in this process, heap that earlier work
    (training, export, another session) freed but kept hides the session's growth, or adds to it. Elsewhere
    (TensorRT, or no ``/proc``) the growth of this process's peak RSS while timing is all there is.
    """
    if runtime == "onnxruntime":
        try:
            return session_rss_mb(folder / bundle.MODEL_FILE, shape, threads, FRESH_SESSION_RUNS), MEASURED_FRESH
        except ConfigError as exc:
            notes.append(f"memory measured in this process instead of a fresh one: {exc}")
    how = MEASURED_HERE + ("" if runtime == "onnxruntime" else f" (host memory; {runtime}'s device memory is not "
                                                               "counted)")
    return grown_mb, how


def _memory_verdict(memory_mb: float | None, measured: str, folder: Path, opts: ValidateOptions,
                    profile: DeviceProfile) -> dict[str, Any]:
    given = opts.max_memory_mb
    budget_mb = float(given if given is not None else profile.memory.model_budget_mb.value)
    passed = None if memory_mb is None else bool(memory_mb <= budget_mb)
    whose = "the" if given is not None else f"{profile.name}'s model"
    return {
        "runtime_mb": None if memory_mb is None else round(memory_mb, 1),
        "measured": measured,
        "model_file_mb": round((folder / bundle.MODEL_FILE).stat().st_size / 1e6, 3),
        "budget_mb": budget_mb,
        "pass": passed,
        "failure": f"memory {memory_mb:.1f} MB exceeds {whose} budget of {budget_mb:g} MB" if passed is False
        else None,
    }
