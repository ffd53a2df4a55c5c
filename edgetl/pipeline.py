"""``edgetl build PIPELINE.yaml``: select -> finetune -> export -> validate, from one build file, incrementally.

A build file (schema: :class:`BuildConfig`, unknown keys rejected)::

    device: raspberry-pi-5          # the target: a profile name, alias, or YAML path
    constraints: {max_latency_ms: 20, max_size_mb: 15}
    model: auto                     # or a catalog name; auto = select's most accurate model that fits
    data: images/                   # class folders, train/ + val/ folders, or a CSV
    finetune: {epochs: 10, lr: 0.001, resolution: 160}
    export: {precision: auto, calibration: {method: entropy}, c_header: true}
    validate: {max_latency_ms: 20}
    out: build/

Relative paths resolve against the build file's folder. The output folder holds::

    OUT/.edgetl-build.json   stage state (written atomically after every change)
    OUT/select/              ranking.json, ranking.csv, pareto.png
    OUT/run/                 the fine-tuning run folder (see edgetl.finetune.api)
    OUT/artifact/            the artifact folder, with validation.json
    OUT/report.md            the build report, with its plots in OUT/report/

**Incremental builds.** Each stage has a key: the hash of its options, the device profile, the versions
of edgetl and its numeric libraries, the fingerprint of its input files and the content digest of the
previous stage's output. A stage whose key matches its last success, and whose outputs are still on
disk unchanged, is skipped. ``force=True`` (``--force``) reruns every stage; ``rerun=[...]``
(``--rerun STAGE``) reruns some. Downstream stages rerun only when what they read changed: a re-trained
model with the same bytes is not exported again.

**Dataset fingerprints.** By default (``data_fingerprint: stat``) a dataset is identified by its file
list with each file's size and modification time (nanoseconds), as make, ninja and rsync's quick check
do. This costs one ``stat`` per image, so a 100,000-image dataset is checked in well under a second,
whereas hashing its contents would read gigabytes on every build. A file rewritten with the same size
and a forged mtime goes unnoticed; ``--force`` covers that. ``data_fingerprint: content`` hashes every
file instead: slower, but stable across ``git clone`` or ``cp`` (which reset mtimes), so a CI checkout
does not retrain.

**Resuming.** The state file records a stage as ``running`` before it starts. If a build is interrupted
during fine-tuning, the next build with the same inputs resumes the run from its last checkpoint
(``finetune(resume=True)``) instead of starting over. Otherwise (or when the run cannot be resumed) it
trains with ``finetune(restart=True)``: the earlier run in ``out/run`` is cleared by the run folder's own rule
(:meth:`edgetl.finetune.rundir.RunDir.clear`: only the run's files; a folder there that is not a run is
refused), never deleted by the build.

**Budgets.** A missed budget (export's accuracy drop, validate's latency or memory) does not stop the
build: the report is written, then :class:`~edgetl.errors.BudgetExceededError` (exit code 3) is raised.
It is a result, not a failure of the build: rebuilding unchanged inputs reports it again without
measuring again; ``--rerun validate`` measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgetl._io import atomic_write_json, sha256_file
from edgetl.buildfile import BUILD_STAGES, BuildConfig, check_names, config_from_dict, load_build_config, stage_inputs
from edgetl.data import scan_dataset
from edgetl.data.discover import walk_images
from edgetl.device.machine import package_versions
from edgetl.device.profiles import load_profile
from edgetl.errors import (
    BudgetExceededError,
    CheckpointError,
    DataError,
    EdgetlError,
    TrainingInterrupted,
    UnknownNameError,
    WeightsError,
)
from edgetl.export import signing
from edgetl.finetune.checkpoint import tensors_digest
from edgetl.finetune.rundir import RunDir
from edgetl.folders import BUILD_LOCK_FILE, BUILD_STATE_FILE, check_apart, folder_lock, require_ours
from edgetl.options import TABLE_ROWS, SourceOptions
from edgetl.report import write_report
from edgetl.select import default_precision, select
from edgetl.validate import validate
from edgetl.zoo.catalog import get_card
from edgetl.zoo.weights import find_weights_file, weights_file_name

log = logging.getLogger(__name__)

STAGES = BUILD_STAGES
STATE_FILE = BUILD_STATE_FILE
LOCK_FILE = BUILD_LOCK_FILE
STATE_VERSION = 1
SELECT_DIR = "select"
RUN_DIR = "run"
ARTIFACT_DIR = "artifact"
REPORT_FILE = "report.md"
__all__ = ["STAGES", "BuildConfig", "BuildResult", "StageOutcome", "build", "config_from_dict",
           "dataset_fingerprint", "load_build_config"]


# --- fingerprints --------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _image_files(folder: Path) -> Iterator[Path]:
    """Every non-hidden image file under ``folder``, in a stable order (links followed, loops not)."""
    return walk_images(folder)


def _file_entry(path: Path, root: Path, mode: str) -> list[Any]:
    st = path.stat()
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    if mode == "content":
        return [name, st.st_size, sha256_file(path)]
    return [name, st.st_size, st.st_mtime_ns]


def files_fingerprint(paths: Iterable[Path], root: Path, mode: str = "stat") -> dict[str, Any]:
    """Fingerprint a set of files: a digest of (relative path, size, mtime_ns or sha256) per file."""
    entries = [_file_entry(p, root, mode) for p in paths]
    return {"files": len(entries), "bytes": sum(e[1] for e in entries), "digest": _digest(entries)}


def dataset_fingerprint(data: str | os.PathLike[str], mode: str = "stat") -> dict[str, Any]:
    """Fingerprint a dataset: every image of a folder tree, or a CSV file and the images it lists.

    Args:
        data: the dataset folder or CSV.
        mode: ``stat`` (relative path, size and mtime of each file) or ``content`` (sha256 of each file).

    Raises:
        DataError: the dataset does not exist.
    """

    root = Path(data)
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist; fix `data:` in the build file")
    if root.is_dir():
        return files_fingerprint(_image_files(root), root, mode)

    splits = scan_dataset(root, check="none")
    paths = [root, *sorted({Path(p) for split in ("train", "val", "test") for p, _ in getattr(splits, split)})]
    return files_fingerprint(paths, root.parent, mode)


def _outputs_fingerprint(paths: Iterable[Path]) -> dict[str, list[int]] | None:
    """Size and mtime of each output file, or None if one is missing."""
    out: dict[str, list[int]] = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            return None
        out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


# --- state ---------------------------------------------------------------------------------------


class _State:
    """``OUT/.edgetl-build.json``: one record per stage; every change is written atomically."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_FILE
        self.data: dict[str, Any] = {"version": STATE_VERSION, "stages": {}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except ValueError:
                log.warning("%s is not valid JSON; every stage will run", self.path)
                data = None
            if isinstance(data, dict) and data.get("version") == STATE_VERSION:
                self.data = data

    def get(self, stage: str) -> dict[str, Any]:
        return dict(self.data["stages"].get(stage) or {})

    def put(self, stage: str, record: dict[str, Any]) -> None:
        self.data["stages"][stage] = record
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)

    def set_meta(self, **meta: Any) -> None:
        self.data.update(meta)
        atomic_write_json(self.path, self.data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _prepare_out(out: Path) -> None:
    require_ours(out, ("build",), "out:", "a build")
    out.mkdir(parents=True, exist_ok=True)


# --- results -------------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    """What happened to one stage in a build.

    Attributes:
        name: ``select``, ``finetune``, ``export`` or ``validate``.
        status: ``ran``, ``resumed`` or ``skipped``.
        reason: why it ran or was skipped (``first build``, ``data changed``, ``unchanged``, ``--force``).
        seconds: time spent in this build (0 when skipped).
        summary: the stage's main figures (also in the state file).
    """

    name: str
    status: str
    reason: str
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "status": self.status, "reason": self.reason,
                "seconds": round(self.seconds, 2), "summary": self.summary}


@dataclass
class BuildResult:
    """What :func:`build` returns.

    Attributes:
        out: the output folder.
        config: the resolved build config.
        model: the catalog id of the model that was fine-tuned.
        run_dir, artifact, report: the run folder, the artifact folder and ``report.md``.
        stages: one :class:`StageOutcome` per stage, in order.
        failures: the budgets that were missed (empty when the build passed).
        validation: the content of the artifact's ``validation.json``.
        seconds: wall-clock time of the build.
    """

    out: Path
    config: BuildConfig
    model: str
    run_dir: Path
    artifact: Path
    report: Path
    stages: list[StageOutcome]
    failures: list[str]
    validation: dict[str, Any]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def stage(self, name: str) -> StageOutcome:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "model": self.model,
            "run_dir": str(self.run_dir),
            "artifact": str(self.artifact),
            "report": str(self.report),
            "passed": self.passed,
            "failures": list(self.failures),
            "stages": [s.to_dict() for s in self.stages],
            "validation": self.validation,
            "seconds": round(self.seconds, 2),
        }


# --- the build -----------------------------------------------------------------------------------


class _Build:
    """One build: the config, the state, and the four stages in order."""

    def __init__(self, config: BuildConfig, source: str, force: set[str], progress: Callable[[str], None] | None,
                 progress_bars: bool) -> None:

        self.config = config
        self.source = source
        self.force = force
        self.progress = progress
        self.progress_bars = progress_bars
        self.out = Path(config.out)
        self.profile = load_profile(config.device)
        self.versions = package_versions()
        self.outcomes: list[StageOutcome] = []
        self.start = time.perf_counter()
        self._data_fingerprint: dict[str, Any] | None = None

    def data_fingerprint(self) -> dict[str, Any]:
        if self._data_fingerprint is None:
            self._data_fingerprint = dataset_fingerprint(self.config.data, self.config.data_fingerprint)
        return self._data_fingerprint

    def say(self, message: str) -> None:
        log.info(message)
        if self.progress is not None:
            self.progress(message)

    # -- the generic stage runner --

    def stage(self, name: str, parts: dict[str, Any], outputs: Callable[[], list[Path]],
              run: Callable[[dict[str, Any]], tuple[dict[str, Any], str]]) -> dict[str, Any]:
        """Run stage ``name`` unless its key matches the last success; return its record.

        ``parts`` are the named inputs whose digests make the key; ``outputs`` lists the files the stage
        leaves; ``run(previous_record)`` does the work and returns ``(summary, digest)``, where the digest
        identifies the output's content for the next stage.
        """
        part_digests = {k: _digest(v) for k, v in parts.items()}
        key = _digest(part_digests)
        prev = self.state.get(name)
        reason = self._why(name, prev, key, part_digests, outputs)
        if reason is None:
            self.say(f"{name}: unchanged since {prev.get('finished', '?')}, skipped")
            outcome = StageOutcome(name, "skipped", "unchanged", 0.0, prev.get("summary", {}))
            self.outcomes.append(outcome)
            return prev
        self.say(f"{name}: running ({reason})")
        started = _now()
        self.state.put(name, {**prev, "status": "running", "key": key, "parts": part_digests, "started": started})
        t0 = time.perf_counter()
        try:
            summary, digest = run(prev)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, EdgetlError) else f"{type(exc).__name__}: {exc}"
            self.state.put(name, {**self.state.get(name), "status": "failed", "error": message[:500]})
            raise
        seconds = time.perf_counter() - t0
        status = "resumed" if summary.pop("_resumed", False) else "ran"
        record = {
            "status": "done", "key": key, "parts": part_digests, "started": started, "finished": _now(),
            "seconds": round(seconds, 2), "digest": digest, "outputs": _outputs_fingerprint(outputs()),
            "summary": summary,
        }
        self.state.put(name, record)
        self.outcomes.append(StageOutcome(name, status, reason, seconds, summary))
        return record

    def _why(self, name: str, prev: dict[str, Any], key: str, parts: dict[str, str],
             outputs: Callable[[], list[Path]]) -> str | None:
        """Why stage ``name`` must run, or None if it can be skipped."""
        if name in self.force:
            return "--force" if self.force >= set(STAGES) else "--rerun"
        if not prev:
            return "first build"
        if prev.get("key") != key:
            old = prev.get("parts") or {}
            changed = [k for k in parts if old.get(k) != parts[k]]
            return ", ".join(changed) + " changed" if changed else "inputs changed"
        if prev.get("status") != "done":
            return f"last run {prev.get('status', 'did not finish')}"
        current = _outputs_fingerprint(outputs())
        if current is None:
            return "outputs missing"
        if current != prev.get("outputs"):
            return "outputs modified"
        return None

    # -- the stages --

    def run(self) -> BuildResult:
        cfg = self.config
        _prepare_out(self.out)
        with folder_lock(self.out, "build", LOCK_FILE):
            self.state = _State(self.out)
            self.state.set_meta(build_file=self.source, config=cfg.to_dict())
            selected = self.stage("select", self._select_parts(), self._select_outputs, self._run_select)
            model = selected["summary"]["model"]
            trained = self.stage("finetune", self._finetune_parts(model), self._finetune_outputs, self._run_finetune)
            exported = self.stage("export", self._export_parts(trained["digest"]), self._export_outputs,
                                  self._run_export)
            validated = self.stage("validate", self._validate_parts(exported["digest"]), self._validate_outputs,
                                   self._run_validate)
            failures = list(exported["summary"].get("failures") or []) + list(
                validated["summary"].get("failures") or [])

            seconds = time.perf_counter() - self.start
            report = write_report(self.out, cfg, self.outcomes, failures, source=self.source, seconds=seconds)
            self.say(f"report: {report}")
        validation = json.loads((self.artifact_dir / "validation.json").read_text())
        return BuildResult(
            out=self.out, config=cfg, model=model, run_dir=self.run_dir, artifact=self.artifact_dir, report=report,
            stages=list(self.outcomes), failures=failures, validation=validation,
            seconds=time.perf_counter() - self.start,
        )

    @property
    def run_dir(self) -> Path:
        return self.out / RUN_DIR

    @property
    def artifact_dir(self) -> Path:
        return self.out / ARTIFACT_DIR

    def _select_precision(self) -> str:
        cfg = self.config
        if cfg.select.precision:
            return cfg.select.precision
        if cfg.export.precision != "auto":
            return cfg.export.precision
        return default_precision(self.profile)

    def _select_resolution(self) -> int | None:
        return self.config.select.resolution or self.config.finetune.resolution

    # select

    def _select_parts(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "options": {"model": cfg.model, "select": cfg.select.model_dump(mode="json"),
                        "constraints": cfg.constraints.model_dump(mode="json"),
                        "precision": self._select_precision(), "resolution": self._select_resolution()},
            "device": self.profile.model_dump(mode="json"),
            "versions": self.versions,
        }

    def _select_outputs(self) -> list[Path]:
        d = self.out / SELECT_DIR
        return [d / "ranking.json", d / "pareto.png"]

    def _run_select(self, prev: dict[str, Any]) -> tuple[dict[str, Any], str]:
        cfg = self.config
        precision = self._select_precision()
        options = cfg.select.model_copy(update={"precision": precision, "resolution": self._select_resolution()})
        inputs = stage_inputs(cfg, "select", options, given=("device",))  # the profile is loaded already
        ranking = select(self.profile, options, cfg.constraints, **inputs)
        n_fit = sum(1 for r in ranking.candidates if r.fits)
        if cfg.model == "auto":
            best = ranking.best  # raises ConstraintError naming the nearest misses when nothing fits
            card, row = best.card, best
            reason = (
                f"model: auto picked the most accurate of the {n_fit} of {len(ranking.candidates)} catalog entries "
                f"that meet the constraints ({ranking.describe_constraints()}) on {self.profile.name} at {precision}"
            )
        else:
            card = get_card(cfg.model)
            row = next((r for r in ranking.candidates if r.card.id == card.id), None)
            if row is None:
                reason = f"{card.id} was named in the build file (it is not among the ranked entries)"
            elif row.fits:
                reason = f"{card.id} was named in the build file; it meets the constraints"
            else:
                reason = (f"{card.id} was named in the build file although it misses the constraints "
                          f"({'; '.join(row.failures)}): validation will tell")
                log.warning(reason)
        folder = self.out / SELECT_DIR
        chosen = None if row is None else {**row.to_dict(), "id": row.card.id, "resolution": row.resolution,
                                           "failures": list(row.failures)}
        rows = [{**r.to_dict(), "id": r.card.id, "chosen": r.card.id == card.id}
                for r in ranking.rows[: options.top or TABLE_ROWS]]
        doc = {
            "device": self.profile.name,
            "precision": precision,
            "batch": ranking.batch,
            "resolution": options.resolution,
            "constraints": ranking.describe_constraints(),
            "latency_budget": ranking.budget.to_dict(),
            "model": card.id,
            "reason": reason,
            "chosen": chosen,
            "candidates": len(ranking.candidates),
            "fitting": n_fit,
            "rows": rows,
            "pareto": [r.card.id for r in ranking.pareto_front],
            "nearest_misses": [{"model": r.card.id, "failures": r.failures} for r in ranking.nearest_misses(3)],
            "skipped": [list(s) for s in ranking.skipped],
            "left_out": [{"model": model, "reason": why} for model, why in ranking.left_out],
        }
        atomic_write_json(folder / "ranking.json", doc)
        ranking.to_csv(folder / "ranking.csv")
        ranking.plot(folder / "pareto.png")
        self.say(f"select: {card.id} ({reason})")
        summary = {"model": card.id, "reason": reason, "fitting": n_fit, "candidates": len(ranking.candidates),
                   "precision": precision}
        return summary, _digest({"model": card.id})

    # finetune

    def _finetune_options(self) -> dict[str, Any]:
        # where and how fast it trains does not change what it learns
        return self.config.finetune.model_dump(mode="json", exclude={"device", "workers", "checkpoint_interval"})

    def _weights_input(self, model: str) -> Any:
        cfg = self.config
        spec = cfg.finetune.weights
        if spec.lower() == "none":
            return "none"
        if spec.lower() == "imagenet":

            card = get_card(model)
            path = find_weights_file(card, cfg.weights_dir)
            # torchvision's file name carries a sha256 prefix: it names the bytes, wherever they come from
            # (a download into the hub cache on the first build, or a pulled file), so a download does
            # not change the key; a different file at the same place does.
            entry = {"weights": card.id, "file": weights_file_name(card)}
            if path is not None and cfg.weights_dir is not None:
                entry["local"] = _file_entry(path, path.parent, "stat")
            return {"imagenet": entry}
        path = Path(spec)
        if not path.is_file():

            raise WeightsError(f"finetune.weights: {path} does not exist; pass imagenet, none, or a state_dict file")
        return {"path": _file_entry(path, path.parent, self.config.data_fingerprint)}

    def _finetune_parts(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "options": self._finetune_options(),
            "weights": self._weights_input(model),
            "data": self.data_fingerprint(),
            "versions": self.versions,
        }

    def _finetune_outputs(self) -> list[Path]:
        return RunDir(self.run_dir).outputs()

    def _run_finetune(self, prev: dict[str, Any]) -> tuple[dict[str, Any], str]:
        from edgetl.finetune.api import finetune  # deferred: the training stage imports torch

        cfg = self.config
        model = self.state.get("select")["summary"]["model"]
        key = self.state.get("finetune").get("key")
        resume = (
            "finetune" not in self.force and prev.get("key") == key and prev.get("status") in ("running", "failed")
            and RunDir(self.run_dir).can_resume()
        )
        if resume:
            self.say(f"finetune: resuming the interrupted run in {self.run_dir}")

        def show(decision: Any) -> None:
            self.say(f"finetune: strategy {decision.strategy} — {decision.reason}")

        def train(resume: bool) -> Any:
            # not resuming: finetune's restart clears an earlier run here (RunDir.clear: only a run folder, only
            # the run's files), so the build never deletes the folder itself
            return finetune(model, str(cfg.data), self.run_dir, cfg.finetune, resume=resume, restart=not resume,
                            progress=self.progress_bars, on_decision=show,
                            **stage_inputs(cfg, "finetune", cfg.finetune))

        try:
            try:
                result = train(resume)
            except CheckpointError as exc:
                if not resume:
                    raise
                # killed between two checkpoint writes: nothing consistent to resume from
                log.warning("cannot resume %s (%s); training from the start", self.run_dir, exc)
                self.say(f"finetune: the interrupted run cannot be resumed ({exc}); training from the start")
                resume = False
                result = train(False)
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(
                exc.epochs_done, exc.epochs_total, f"run `edgetl build {self.source}` again to resume"
            ) from None
        summary = {
            "model": result.model,
            "strategy": result.strategy.strategy,
            "strategy_reason": result.strategy.reason,
            "val_accuracy": result.val_accuracy,
            "test_accuracy": result.test_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "_resumed": resume,
        }

        digest = _digest([tensors_digest(result.checkpoint), result.classes])
        return summary, digest

    # export

    def _export_inputs(self) -> dict[str, Any]:
        # the source is the run: the build file's weights and resolution went to finetune
        return stage_inputs(self.config, "export", self.config.export, skip=(SourceOptions,))

    def _export_parts(self, finetune_digest: str) -> dict[str, Any]:
        cfg = self.config
        calib = cfg.export.calibration.data
        signer = signing.load_signer(cfg.export.sign_key)
        return {
            "model": finetune_digest,
            "options": cfg.export.model_dump(mode="json"),
            "inputs": {k: str(v) if isinstance(v, Path) else v for k, v in self._export_inputs().items()},
            "device": self.profile.model_dump(mode="json"),
            # the run's train/val images calibrate and evaluate the export
            "data": self.data_fingerprint(),
            "calibration_data": None if calib is None else files_fingerprint(
                _image_files(calib), calib, cfg.data_fingerprint) if calib.is_dir() else str(calib),
            "versions": self.versions,
            # the key's public fingerprint: a new key at the same path signs again (and nothing secret is kept)
            "signing_key": None if signer is None else signer.fingerprint,
        }

    def _export_outputs(self) -> list[Path]:
        manifest = self.artifact_dir / "manifest.json"
        signature = [self.artifact_dir / signing.SIGNATURE_FILE] if self.config.export.sign_key else []
        try:
            files = list(json.loads(manifest.read_text()).get("files", {}))
        except (OSError, ValueError):
            return [manifest, *signature]
        return [manifest, *signature] + [self.artifact_dir / name for name in files]

    def _run_export(self, prev: dict[str, Any]) -> tuple[dict[str, Any], str]:
        from edgetl.export.api import export  # deferred: the export stage imports torch

        cfg = self.config
        artifact = export(
            self.run_dir, self.artifact_dir, cfg.export, **self._export_inputs(),
            force=True, check=False, progress=lambda msg: self.say(f"export: {msg}"),
        )
        acc = artifact.accuracy
        summary = {
            "precision": artifact.precision,
            "fp32_top1": acc.get("fp32_top1"),
            "top1": acc.get("top1"),
            "drop_pts": acc.get("drop_pts"),
            "failures": list(artifact.failures),
        }
        return summary, sha256_file(self.artifact_dir / "manifest.json")

    # validate

    def _validation_data(self) -> Path | None:
        cfg = self.config
        if cfg.validate_.data is not None:
            return cfg.validate_.data
        test = cfg.data / "test"
        return test if cfg.data.is_dir() and test.is_dir() else None

    def _validation_budget(self) -> float | None:
        # a budget the build file states; select's default one (one frame at 30 fps) only ranks
        return self.config.validate_.max_latency_ms or self.config.constraints.stated_latency_ms

    def _memory_budget(self) -> float | None:
        return self.config.validate_.max_memory_mb or self.config.constraints.max_memory_mb

    def _validate_parts(self, export_digest: str) -> dict[str, Any]:
        cfg = self.config
        data = self._validation_data()
        options = cfg.validate_.model_dump(mode="json")
        options.update(max_latency_ms=self._validation_budget(), max_memory_mb=self._memory_budget(),
                       data=None if data is None else str(data))
        return {
            "artifact": export_digest,
            "options": options,
            "device": self.profile.model_dump(mode="json"),
            "data": None if data is None else files_fingerprint(_image_files(data), data, cfg.data_fingerprint),
            "versions": self.versions,
        }

    def _validate_outputs(self) -> list[Path]:
        return [self.artifact_dir / "validation.json"]

    def _run_validate(self, prev: dict[str, Any]) -> tuple[dict[str, Any], str]:
        options = self.config.validate_.model_copy(update={
            "data": self._validation_data(), "max_latency_ms": self._validation_budget(),
            "max_memory_mb": self._memory_budget()})
        report = validate(self.artifact_dir, options=options, write=True, check=False,
                          **stage_inputs(self.config, "validate", options))
        lat = report.latency
        summary = {
            "passed": report.passed,
            "failures": list(report.failures),
            "runtime": report.runtime,
            "p50_ms": lat.get("p50_ms"),
            "judged_ms": lat.get("judged_ms"),
            "judged_on": lat.get("judged_on"),
            "budget_ms": lat.get("budget_ms"),
            "accuracy": None if report.accuracy is None else report.accuracy.get("top1"),
        }
        verdict = "passed" if report.passed else "FAILED: " + "; ".join(report.failures)
        self.say(f"validate: {_judged(lat, report.runtime)}; {verdict}")
        return summary, _digest(summary)


def _judged(lat: dict[str, Any], runtime: str) -> str:
    """The latency figure the budget was judged on and what it is, else the p50 measured here."""
    if lat.get("judged_ms") is not None:
        return f"{lat['judged_ms']} ms ({lat.get('judged_on')})"
    return f"p50 {lat.get('p50_ms')} ms measured here on {runtime}"


def _force_set(force: bool | str | Iterable[str]) -> set[str]:
    if force is True:
        return set(STAGES)
    if not force:
        return set()
    names = [force] if isinstance(force, str) else list(force)
    bad = [n for n in names if n not in STAGES]
    if bad:

        raise UnknownNameError("stage", bad[0], STAGES, "stages: " + ", ".join(STAGES))
    return set(names)


def build(
    config: str | os.PathLike[str] | BuildConfig | dict[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    force: bool | str | Iterable[str] = False,
    weights_dir: str | os.PathLike[str] | None = None,
    sign_key: str | os.PathLike[str] | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
    progress_bars: bool = False,
) -> BuildResult:
    """Run a build: select -> finetune -> export -> validate, skipping the stages whose inputs did not change.

    Args:
        config: a build file path, a dict with the same keys (relative paths against the CWD), or a
            :class:`BuildConfig`.
        out: override the build file's ``out:`` (relative to the CWD).
        force: ``True`` reruns every stage; a stage name or names (``"export"``) rerun those.
        weights_dir: override ``weights_dir:`` (an offline folder of torchvision weights; the default
            is ``$EDGETL_WEIGHTS_DIR``).
        sign_key: override ``export.sign_key`` (a private key, PEM, that signs the artifact's manifest).
        check: raise :class:`BudgetExceededError` (exit code 3) when a budget was missed, after the
            report is written. Its ``result`` attribute holds the :class:`BuildResult`.
        progress: called with a one-line message at each step.
        progress_bars: show fine-tuning progress bars on stderr.

    Returns:
        The :class:`BuildResult`.

    Raises:
        ConfigError: an invalid build file (one line: file, field, fix), or an ``out`` folder that
            holds files edgetl did not write.
        BudgetExceededError: (with ``check``) a budget was missed.
        EdgetlError: any stage's user error (bad data, unknown model, no model fits, ...).
    """
    force_set = _force_set(force)
    if isinstance(config, BuildConfig):
        cfg, source = config, "build config"
    elif isinstance(config, dict):
        cfg, source = config_from_dict(config), "build config"
    else:
        cfg, source = load_build_config(config), str(Path(config))
    updates: dict[str, Any] = {}
    if out is not None:
        updates["out"] = Path(out).expanduser().resolve()
    if weights_dir is not None:
        updates["weights_dir"] = Path(weights_dir).expanduser().resolve()
    if sign_key is not None:
        updates["export"] = cfg.export.model_copy(update={"sign_key": Path(sign_key).expanduser().resolve()})
    if updates:
        cfg = cfg.model_copy(update=updates)
    check_names(cfg, source)
    signing.load_signer(cfg.export.sign_key, f"{source}: export.sign_key:")  # a bad key fails before any stage
    if cfg.validate_.verify_key is not None:
        signing.load_public_key(cfg.validate_.verify_key, f"{source}: validate.verify_key:")
    check_apart(cfg.out, {"data:": cfg.data, "validate.data:": cfg.validate_.data,
                          "export.calibration.data:": cfg.export.calibration.data}, "out:")
    result = _Build(cfg, source, force_set, progress, progress_bars).run()
    if check and result.failures:
        error = BudgetExceededError(f"{'; '.join(result.failures)} (see {result.report})")
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result
