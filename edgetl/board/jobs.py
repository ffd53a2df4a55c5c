"""What ``--on ssh://HOST`` runs on a board, job by job: its fingerprint, timing an ONNX file, validating and
running an artifact. Each opens one SSH connection (:class:`~edgetl.runtime.ssh.Board`), ships what the job needs
(:func:`edgetl.board.host.run_job`) and turns the runner's JSON back into edgetl's objects."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.board.host import artifact_files, image_files, python_path, run_job
from edgetl.device.nearest import nearest_profile
from edgetl.errors import ConfigError
from edgetl.export import bundle
from edgetl.runtime.bench import BenchResult
from edgetl.runtime.ssh import Board
from edgetl.runtime.tensorrt import require_qdq

#: Runs of the fresh-process memory measurement on the board (as validate's on this machine).
MEMORY_RUNS = 3


@dataclass(frozen=True)
class Remote:
    """Where to run: ``on`` (``ssh://[user@]host[:port]``), the board's interpreter, whether to trust a new host
    key, and the runtime there (the fields of :class:`~edgetl.options.RemoteOptions`)."""

    on: str
    device_python: str | os.PathLike[str] | None = None
    accept_new_host_key: bool = False
    runtime: str = "onnxruntime"

    @classmethod
    def of(cls, options: Any) -> Remote | None:
        """From any options object with the fields ``on``, ``device_python``, ``accept_new_host_key`` and
        ``runtime``; None without ``on``.

        Raises:
            ConfigError: a board's runtime (tensorrt) without ``on``.
        """
        runtime = getattr(options, "runtime", None) or "onnxruntime"
        if not getattr(options, "on", None):
            if runtime != "onnxruntime":
                raise ConfigError(f"--runtime {runtime} picks the runtime on a board: pass --on ssh://HOST too (on "
                                  "this machine the device profile's runtime runs)")
            return None
        return cls(options.on, getattr(options, "device_python", None),
                   bool(getattr(options, "accept_new_host_key", False)), runtime)

    def run(self, job: dict[str, Any], files: dict[str, Path] | None = None) -> dict[str, Any]:
        """Connect, run ``job`` with ``files`` on the board, disconnect; the runner's result."""
        with Board(self.on, self.accept_new_host_key) as board:
            return run_job(board, job, files, python_path(self.device_python))


@dataclass
class BoardRun:
    """What a board measured for ``validate --on``.

    Attributes:
        golden: the golden check's result on the board's runtime.
        result: the timing, as :func:`edgetl.runtime.bench.benchmark` reports it.
        memory_mb: the session's peak RSS in a fresh process on the board (None where it could not be measured).
        memory_note: why not.
        logits: the outputs on the scoring images, in order (empty without images).
        board: the address, the board's fingerprint and the nearest built-in profile.
    """

    golden: dict[str, Any]
    result: BenchResult
    memory_mb: float | None
    memory_note: str | None
    logits: list[list[float]] = field(default_factory=list)
    board: dict[str, Any] = field(default_factory=dict)


def describe(address: str, machine: dict[str, Any]) -> dict[str, Any]:
    """The board as a report records it: address, fingerprint (:func:`edgetl.device.machine.machine_info`) and the
    nearest built-in profile."""
    name, why = nearest_profile(machine)
    return {"address": address, **machine, "nearest_profile": name, "nearest_profile_why": why}


def bench_result(doc: dict[str, Any], name: str) -> BenchResult:
    """A :class:`BenchResult` from the board's ``to_dict(include_times=True)``."""
    return BenchResult.from_times([t / 1e3 for t in doc["times_ms"]], name=name, backend=doc["backend"],
                                  shape=doc["shape"], warmup=int(doc["warmup"]), peak_rss_mb=doc["peak_rss_mb"])


def board_info(remote: Remote) -> dict[str, Any]:
    """The board's fingerprint: CPU, cores, memory, OS, Python, runtime versions, GPU; and the nearest profile."""
    return describe(remote.on, remote.run({"task": "info"})["machine"])


def _runtime(remote: Remote, model: Path, precision: str) -> dict[str, Any]:
    """The job's runtime, and for TensorRT the precision of the engine the board builds from ``model`` (INT8: a
    QDQ model, checked here, where onnx is)."""
    if remote.runtime != "tensorrt":
        return {"runtime": remote.runtime}
    if precision == "int8":
        require_qdq(model)
    return {"runtime": "tensorrt", "precision": precision}


def artifact_precision(folder: Path) -> str:
    """The precision of the engine a board builds from an artifact's ``model.onnx``: the artifact's own, as export
    builds ``model.engine`` (:func:`edgetl.export.tensorrt.engine_precision`), so that the engine computes what the
    artifact's accuracy was measured on."""
    return str(bundle.read_manifest(folder).get("precision", "fp32"))


def bench_on_board(remote: Remote, model: Path, shape: Sequence[int], iterations: int, warmup: int,
                   threads: int | None, precision: str = "fp16") -> tuple[BenchResult, dict[str, Any]]:
    """Time an ONNX file on the board (with TensorRT: an engine of ``precision``, built there): the result, and the
    board as :func:`describe` gives it."""
    job = {"task": "bench", "model": "model/model.onnx", "shape": list(shape), "iterations": iterations,
           "warmup": warmup, "threads": threads, **_runtime(remote, Path(model), precision)}
    out = remote.run(job, {"model/model.onnx": Path(model)})
    return bench_result(out["bench"], Path(model).name), describe(remote.on, out["machine"])


def validate_on_board(remote: Remote, folder: Path, shape: Sequence[int], iterations: int, warmup: int,
                      threads: int | None, images: Sequence[Path] = ()) -> BoardRun:
    """Check the golden outputs, time, measure memory and run the scoring images of an artifact on the board, with
    the remote's runtime."""
    shipped = image_files(list(images))
    job = {"task": "validate", "artifact": "artifact", "shape": list(shape), "iterations": iterations,
           "warmup": warmup, "threads": threads, "memory_runs": MEMORY_RUNS, "images": list(shipped),
           **_runtime(remote, folder / bundle.MODEL_FILE, artifact_precision(folder))}
    out = remote.run(job, {**artifact_files(folder), **shipped})
    return BoardRun(golden=out["golden"], result=bench_result(out["bench"], remote.runtime),
                    memory_mb=out.get("memory_mb"), memory_note=out.get("memory_note"),
                    logits=out.get("logits") or [], board=describe(remote.on, out["machine"]))


def predict_on_board(remote: Remote, folder: Path, images: Sequence[Path], check: bool = False,
                     ) -> tuple[list[list[float]], dict[str, Any] | None]:
    """An artifact's outputs on ``images``, computed on the board with the remote's runtime (with ``check``, after
    its golden check)."""
    shipped = image_files(list(images))
    job = {"task": "predict", "artifact": "artifact", "images": list(shipped), "check": check,
           **_runtime(remote, folder / bundle.MODEL_FILE, artifact_precision(folder))}
    out = remote.run(job, {**artifact_files(folder), **shipped})
    return out["logits"], out.get("golden")
