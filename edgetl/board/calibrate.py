"""``edgetl device calibrate --on ssh://HOST``: measure a board over SSH and fit its profile here.

The board runs what a local calibration runs, with the same code, and needs no ``onnx`` or torch package: every ONNX
file is built here. First the models: the calibration architectures, a one-ReLU model and ResNet-18 as static INT8
are exported here and timed on the board (:func:`edgetl.board.runner.task_calibrate`: steady-state timings, the
sessions' memory, FP32 against INT8, memory bandwidth and the BLAS rate). Then the kernels: the windows of
:func:`edgetl.calibrate.kernel_plan.kernel_plan` (the calibration models under ONNX Runtime's profiler, micro-graphs
of the catalog's distinct kernels, the profiler's own cost, the cost of a run, the channel block, the DRAM streaming
rate), built here and run on the board under the noise guard (:func:`edgetl.board.runner.task_kernels`). The fit is
:func:`edgetl.calibrate.api.calibrate` with what the board measured (:class:`~edgetl.calibrate.api.Readings`), so
the kernel model and the noise figures are fitted and recorded as a local calibration's are.

Files are kept on the board in a cache folder keyed by their sha256 (:data:`BOARD_CACHE`), so a second calibration
sends none of them again; it is the one thing edgetl leaves on a board (``rm -rf ~/.cache/edgetl/board-models``
removes it; ``$XDG_CACHE_HOME`` on the board moves it). The first one sends every file: with the default models
and :data:`~edgetl.options.KERNEL_SAMPLES` micro-graphs, 436 files and 2.4 GB (the streaming probe's weights, 4x the
board's last-level cache, are an input made on the board).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgetl._io import sha256_file
from edgetl.board.host import python_path, run_job
from edgetl.board.jobs import Remote
from edgetl.calibrate.api import (
    CALIBRATION_MODELS,
    INT8_MODEL,
    CalibrationResult,
    Readings,
    _check_request,
    _memory_models,
    calibrate,
    tiny_session_model,
)
from edgetl.calibrate.kernel_plan import KernelPlan, kernel_plan
from edgetl.calibrate.measure import Measurement, architecture_onnx
from edgetl.device.machine import CpuInfo
from edgetl.options import KERNEL_SAMPLES
from edgetl.runtime.bench import BenchResult, random_input
from edgetl.runtime.ssh import Board
from edgetl.zoo.catalog import get_card
from edgetl.zoo.quantize import quantize_int8_static

BOARD_CACHE = "edgetl/board-models"
"""The board's model cache, under ``$XDG_CACHE_HOME`` (default ``~/.cache``) there."""
PASSES, WARMUP = 3, 5


@dataclass
class Transfer:
    """What a board calibration sent and how its time was spent.

    Attributes:
        files, megabytes: the files sent (those not yet in the board's cache) and their size.
        jobs_s: the jobs' time, from sending them to their answers.
        board_s: the part of it the runner spent measuring on the board; the rest (:attr:`overhead_s`) is sending,
            unpacking, connecting and starting the runner.
    """

    files: int = 0
    megabytes: float = 0.0
    jobs_s: float = 0.0
    board_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """The jobs' time beyond measuring: the cost of running on the board over SSH."""
        return self.jobs_s - self.board_s


@dataclass
class BoardMeasurements:
    """What the board measured: the models (``out``, with their ``sizes``), its fingerprint, the kernel windows
    and their raw timings (None: not timed), and what it cost to send."""

    out: dict[str, Any]
    machine: dict[str, Any]
    kernels: tuple[KernelPlan, dict[str, Any]] | None
    transfer: Transfer


def _cached_on_board(board: Board) -> set[str]:
    """The content hashes already in the board's model cache."""
    done = board.run(f'ls "${{XDG_CACHE_HOME:-$HOME/.cache}}/{BOARD_CACHE}" 2>/dev/null; exit 0')
    return {name[:-5] for name in done.stdout.decode(errors="replace").split() if name.endswith(".onnx")}


def _job(models: Sequence[str], digest: Mapping[str, str], sizes: dict[str, int], threads: int | None, rounds: int,
         int8: bool) -> dict[str, Any]:
    shape = {m: [1, 3, sizes[m], sizes[m]] for m in sizes}
    return {"task": "calibrate", "cache": BOARD_CACHE, "models": sorted(set(digest.values())), "threads": threads,
            "tiny": digest["tiny"], "passes": PASSES, "per_pass": -(-rounds // PASSES), "warmup": WARMUP,
            "timed": {m: [digest[m], shape[m]] for m in models},
            "memory": {m: [digest[m], shape[m]] for m in _memory_models(models)},
            "int8": [{"fp32": digest[INT8_MODEL], "int8": digest["int8"]}, shape[INT8_MODEL]] if int8 else None,
            "int8_rounds": max(1, math.ceil(rounds / 3))}


def _files(models: Sequence[str], resolution: int | None, tmp: Path, int8: bool) -> tuple[dict[str, Path],
                                                                                          dict[str, int]]:
    """The ONNX files to time (exported here, cached here), and each model's input size."""
    names = list(dict.fromkeys([*models, *([INT8_MODEL] if int8 else [])]))
    sizes = {m: int(resolution or get_card(m).resolution) for m in names}
    files = {m: architecture_onnx(m, sizes[m]) for m in names}
    (tmp / "tiny.onnx").write_bytes(tiny_session_model())
    files["tiny"] = tmp / "tiny.onnx"
    if int8:
        shape = (1, 3, sizes[INT8_MODEL], sizes[INT8_MODEL])
        quantize_int8_static(files[INT8_MODEL], tmp / "int8.onnx", [random_input(shape, s) for s in range(4)])
        files["int8"] = tmp / "int8.onnx"
    return files, sizes


class _Session:
    """One SSH connection to the board, its jobs, the files they ship (by content hash, those not in its cache)
    and what they cost (:class:`Transfer`)."""

    def __init__(self, board: Board, python: str) -> None:
        self.board, self.python, self.transfer = board, python, Transfer()
        self.digest = lru_cache(maxsize=None)(sha256_file)

    def run(self, job: dict[str, Any], files: Mapping[str, Path]) -> dict[str, Any]:
        """Run ``job``, shipping those of ``files`` (key -> path; ``job["models"]``: their hashes) not in the
        board's cache."""
        have = _cached_on_board(self.board)
        ship = {f"models/{d}.onnx": p for d, p in {self.digest(p): p for p in files.values()}.items() if d not in have}
        start = time.monotonic()
        out = run_job(self.board, job, ship, self.python)
        self.transfer.jobs_s += time.monotonic() - start
        self.transfer.board_s += float(out.get("seconds", 0.0))
        self.transfer.files += len(ship)
        self.transfer.megabytes += sum(p.stat().st_size for p in ship.values()) / 1e6
        return out


def _measure_kernels(session: _Session, plan: KernelPlan, threads: int, folder: Path) -> dict[str, Any]:
    """Run the kernel windows of ``plan`` on the board: what they measured (raw, for
    :func:`edgetl.calibrate.kernel_plan.fit_kernels`)."""
    folder.mkdir()
    files = plan.write(folder)
    keys = {key: session.digest(path) for key, path in files.items()}
    return session.run({"task": "kernels", "cache": BOARD_CACHE, "models": sorted(set(keys.values())),
                        "files": keys, "plan": plan.job(), "threads": threads}, files)


def measure_board(remote: Remote, models: Sequence[str], threads: int | None, rounds: int, resolution: int | None,
                  int8: bool = True, kernel_samples: int = KERNEL_SAMPLES, kernel_models: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> BoardMeasurements:
    """Run the calibration measurements on the board: the models, then (``kernel_samples`` > 0) the kernels, with
    ``kernel_samples`` micro-graphs of the distinct kernels of ``kernel_models`` (default: the whole catalog)."""
    with tempfile.TemporaryDirectory(prefix="edgetl-cal-") as tmp, Board(remote.on, remote.accept_new_host_key) as b:
        session = _Session(b, python_path(remote.device_python))
        files, sizes = _files(models, resolution, Path(tmp), int8)
        digest = {key: session.digest(path) for key, path in files.items()}
        out = session.run(_job(models, digest, sizes, threads, rounds, int8), files)
        kernels = None
        if kernel_samples > 0:
            if progress:
                progress("kernels, one by one")
            cpu = out["machine"]["cpu"]
            plan = kernel_plan(models, resolution, kernel_models, kernel_samples, float(cpu["llc_mb"]))
            kernels = (plan, _measure_kernels(session, plan, threads or int(cpu["cores"]), Path(tmp) / "kernels"))
    return BoardMeasurements({**out, "sizes": sizes}, out["machine"], kernels, session.transfer)


def _readings(measured: BoardMeasurements, threads: int) -> Readings:
    out, machine, c = measured.out, measured.machine, measured.machine["cpu"]
    speedup, note = None, ""
    if out.get("int8_ms"):
        fp32, q = out["int8_ms"]["fp32"], out["int8_ms"]["int8"]
        speedup = fp32["min"] / q["min"]
        note = (f"measured by edgetl device calibrate --on: {INT8_MODEL} at {out['sizes'][INT8_MODEL]} px, FP32 "
                f"{fp32['min']:.2f} ms / static QDQ INT8 {q['min']:.2f} ms (minimum of {q['runs']} runs each, "
                f"interleaved), {threads} threads")
    return Readings(cpu=CpuInfo(c["model"], int(c["cores"]), float(c["ghz"]), list(c["isa"]), float(c["ram_mb"])),
                    bandwidth_gbs=float(out["bandwidth_gbs"]), gemm_gflops=float(out["gemm_gflops"]),
                    overhead_mb=float(out["overhead_mb"]), host=str(machine["host"]),
                    runtime_version=str(machine["packages"].get("onnxruntime")),
                    fingerprint=machine["fingerprint"], int8_speedup=speedup, int8_note=note,
                    kernels=measured.kernels)


def _measurements(measured: BoardMeasurements, models: Sequence[str], threads: int) -> dict[str, Measurement]:
    """The board's steady-state timings of ``models``, as :func:`edgetl.calibrate.measure.measure_models` reports
    them here."""
    found = {}
    for m in models:
        size = measured.out["sizes"][m]
        r = BenchResult.from_times([t / 1e3 for t in measured.out["times_ms"][m]], name=m, backend="onnxruntime",
                                   shape=(1, 3, size, size), warmup=WARMUP, cv_threshold=10.0)
        found[m] = Measurement(model=m, resolution=size, batch=1, min_ms=r.min, p10_ms=r.percentile(10),
                               p50_ms=r.p50, cv=r.cv, runs=r.iterations, threads=threads)
    return found


def calibrate_on_board(remote: Remote, name: str, out: str | os.PathLike[str] | None = None,
                       models: Sequence[str] = CALIBRATION_MODELS, threads: int | None = None, rounds: int = 25,
                       resolution: int | None = None, int8: bool = True, kernel_samples: int = KERNEL_SAMPLES,
                       kernel_models: Sequence[str] | None = None,
                       progress: Callable[[int, int, str], None] | None = None) -> tuple[CalibrationResult, Transfer]:
    """Measure a board over SSH and write the profile fitted to it, as :func:`edgetl.calibrate.api.calibrate` does
    for this machine (``kernel_samples`` and ``kernel_models`` as there); the result, and what was sent.

    Raises:
        RemoteError: the board cannot be reached or used (one line each).
        ConfigError: a bad profile name, too few models, or a bad ``out`` (before anything is measured).
    """
    _check_request(name, models, out)  # before minutes of measuring
    if progress:
        progress(0, 3, f"measuring {remote.on}")
    measured = measure_board(remote, models, threads, rounds, resolution, int8, kernel_samples, kernel_models,
                             (lambda step: progress(1, 3, step)) if progress else None)
    threads = threads or int(measured.machine["cpu"]["cores"])
    if progress:
        progress(2, 3, "fitting")
    result = calibrate(name=name, out=out, models=models, threads=threads, rounds=rounds, resolution=resolution,
                       measurements=_measurements(measured, models, threads), memory_mb=measured.out["memory_mb"],
                       runtime="onnxruntime", readings=_readings(measured, threads))
    return result, measured.transfer
