"""``edgetl device calibrate --on ssh://HOST``: measure a board over SSH and fit its profile here.

The ONNX files (the calibration architectures, a one-ReLU model, ResNet-18 as static INT8) are exported here and
timed on the board (:func:`edgetl.board.runner.task_calibrate`); the fit is :func:`edgetl.calibrate.api.calibrate`
with what the board measured (:class:`~edgetl.calibrate.api.Readings`). Models are kept on the board in a cache
folder keyed by their sha256 (:data:`BOARD_CACHE`), so a second calibration sends none of them again; it is the one
thing edgetl leaves on a board (``rm -rf ~/.cache/edgetl/board-models`` removes it; ``$XDG_CACHE_HOME`` on the
board moves it). Kernels are not timed on the board yet: its latency is then predicted by the fitted roofline.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
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
from edgetl.calibrate.measure import Measurement, architecture_onnx
from edgetl.device.machine import CpuInfo
from edgetl.runtime.bench import BenchResult, random_input
from edgetl.runtime.ssh import Board
from edgetl.zoo.catalog import get_card
from edgetl.zoo.quantize import quantize_int8_static

BOARD_CACHE = "edgetl/board-models"
"""The board's model cache, under ``$XDG_CACHE_HOME`` (default ``~/.cache``) there."""
PASSES, WARMUP = 3, 5


def _cached_on_board(board: Board) -> set[str]:
    """The content hashes already in the board's model cache."""
    done = board.run(f'ls "${{XDG_CACHE_HOME:-$HOME/.cache}}/{BOARD_CACHE}" 2>/dev/null; exit 0')
    return {name[:-5] for name in done.stdout.decode(errors="replace").split() if name.endswith(".onnx")}


def _job(models: Sequence[str], files: dict[str, Path], sizes: dict[str, int], threads: int | None, rounds: int,
         int8: bool) -> dict[str, Any]:
    digest = {key: sha256_file(path) for key, path in files.items()}
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


def measure_board(remote: Remote, models: Sequence[str], threads: int | None, rounds: int,
                  resolution: int | None, int8: bool = True) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Run the calibration measurements on the board: its answer, its fingerprint, and how many files were sent."""
    with tempfile.TemporaryDirectory(prefix="edgetl-cal-") as tmp, Board(remote.on, remote.accept_new_host_key) as b:
        files, sizes = _files(models, resolution, Path(tmp), int8)
        job = _job(models, files, sizes, threads, rounds, int8)
        have = _cached_on_board(b)
        digests = {sha256_file(p): p for p in files.values()}
        ship = {f"models/{d}.onnx": p for d, p in digests.items() if d not in have}
        out = run_job(b, job, ship, python_path(remote.device_python))
    return {**out, "sizes": sizes}, out["machine"], len(ship)


def _readings(out: dict[str, Any], machine: dict[str, Any], threads: int) -> Readings:
    c = machine["cpu"]
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
                    fingerprint=machine["fingerprint"], int8_speedup=speedup, int8_note=note)


def calibrate_on_board(remote: Remote, name: str, out: str | os.PathLike[str] | None = None,
                       models: Sequence[str] = CALIBRATION_MODELS, threads: int | None = None, rounds: int = 25,
                       resolution: int | None = None, int8: bool = True,
                       progress: Callable[[int, int, str], None] | None = None) -> tuple[CalibrationResult, int]:
    """Measure a board over SSH and write the profile fitted to it; the result, and how many files were sent.

    Raises:
        RemoteError: the board cannot be reached or used (one line each).
        ConfigError: a bad profile name, too few models, or a bad ``out`` (before anything is measured).
    """
    _check_request(name, models, out)  # before minutes of measuring
    if progress:
        progress(0, 2, f"measuring {remote.on}")
    measured, machine, sent = measure_board(remote, models, threads, rounds, resolution, int8)
    threads = threads or int(machine["cpu"]["cores"])
    measurements = {}
    for m in models:
        size = measured["sizes"][m]
        r = BenchResult.from_times([t / 1e3 for t in measured["times_ms"][m]], name=m, backend="onnxruntime",
                                   shape=(1, 3, size, size), warmup=WARMUP, cv_threshold=10.0)
        measurements[m] = Measurement(model=m, resolution=size, batch=1, min_ms=r.min, p10_ms=r.percentile(10),
                                      p50_ms=r.p50, cv=r.cv, runs=r.iterations, threads=threads)
    if progress:
        progress(1, 2, "fitting")
    result = calibrate(name=name, out=out, models=models, threads=threads, rounds=rounds, resolution=resolution,
                       measurements=measurements, memory_mb=measured["memory_mb"], runtime="onnxruntime",
                       readings=_readings(measured, machine, threads), kernel_samples=0)
    return result, sent
