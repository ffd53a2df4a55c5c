"""The board side of ``--on ssh://HOST``: ``python3 -m edgetl.board.runner JOB.json`` on the board.

It needs Python >= 3.8, numpy, Pillow and its runtime, nothing else: ONNX Runtime, or (a job's ``runtime``
``tensorrt``, on a Jetson) TensorRT and cuda-python, with an engine built on the board from the ONNX file it was
sent. edgetl ships this module with the torch-free modules it reuses (preprocessing, the golden check, the timing
loop, the runners, the machine fingerprint, the profiler windows and the noise guard of kernel calibration) in a
zip (see :mod:`edgetl.board.host`). It prints one JSON document on stdout: ``{"result": ...}``, or ``{"error":
{"type": ..., "message": ...}}`` with exit status 3. Every heavy import is made inside a task, so that a missing
package is reported as an error that names it.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from edgetl.device.machine import machine_info
from edgetl.errors import BoardSetupError, ConfigError, EdgetlError

#: The pip package that provides each module the runner imports.
PACKAGES = {"numpy": "numpy", "PIL": "pillow", "onnxruntime": "onnxruntime", "cuda": "cuda-python"}
#: How to install the modules for which ``pip install PACKAGE`` is not the whole answer (``{pip}``: the board
#: Python's pip).
INSTALL = {"tensorrt": "on a Jetson, TensorRT's Python package comes with JetPack: `sudo apt install "
                       "python3-libnvinfer` (it is the system python3's: pass --device-python /usr/bin/python3, or "
                       "make the venv with --system-site-packages)",
           "cuda": "install it on the board with `{pip} install 'cuda-python==12.*'` (its major version must be the "
                   "board's CUDA's, `nvcc --version`: 12 on JetPack 6, 11 on JetPack 5)"}
MIN_PYTHON = (3, 8)
EXIT_ERROR = 3
#: Images per inference when the outputs on images are computed (within a TensorRT engine's profile).
BATCH = 8


def _require(*modules: str) -> None:
    """Import ``modules``; a missing one is a :class:`BoardSetupError` naming the package to install."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            pip = f"{Path(sys.executable).name} -m pip"
            how = INSTALL.get(name, f"install it on the board with `{pip} install {PACKAGES.get(name, name)}`")
            raise BoardSetupError(f"the board's Python ({platform.python_version()}, {sys.executable}) cannot import "
                                  f"{name} ({exc}): {how.format(pip=pip)}") from None


def _runner(model: Path, job: dict[str, Any]) -> Any:
    """A runner of the ONNX file ``model`` on the job's runtime: ONNX Runtime on the CPU, or TensorRT with an engine
    built here (in the job's ``precision``; its profile takes the timed batch and :data:`BATCH`)."""
    if job.get("runtime", "onnxruntime") == "tensorrt":
        _require("numpy", "tensorrt", "cuda")
        from edgetl.runtime.tensorrt_core import TensorRTCudaRunner

        batch = int(job["shape"][0]) if job.get("shape") else 1
        return TensorRTCudaRunner(model, precision=job["precision"], max_batch=max(batch, BATCH), opt_batch=batch,
                                  name="tensorrt")
    _require("numpy", "onnxruntime")
    from edgetl.runtime.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, providers="cpu", threads=job.get("threads"), name="onnxruntime")


def _time(runner: Any, model: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Time ``runner`` as the host would (:func:`edgetl.runtime.bench.benchmark`), and the memory of an ONNX Runtime
    session of ``model``."""
    from edgetl.runtime.bench import benchmark, session_rss_mb

    shape = tuple(int(d) for d in job["shape"])
    result = benchmark(runner, shape=shape, iterations=int(job["iterations"]), warmup=int(job["warmup"]))
    out: dict[str, Any] = {"bench": result.to_dict(include_times=True)}
    if job.get("memory_runs") and runner.backend != "onnxruntime":
        out["memory_mb"], out["memory_note"] = None, (f"only an ONNX Runtime session's is measured there, not "
                                                      f"{runner.backend}'s (host and GPU)")
    elif job.get("memory_runs"):
        try:
            out["memory_mb"] = session_rss_mb(model, shape, job.get("threads"), int(job["memory_runs"]))
        except EdgetlError as exc:
            out["memory_mb"], out["memory_note"] = None, str(exc)
    return out


def _logits(folder: Path, runner: Any, images: list[str], batch: int) -> list[list[float]]:
    """The model's outputs on ``images``, each prepared by the artifact's preprocess.json (the one preprocessing)."""
    import numpy as np

    from edgetl.data.preprocess import load_tensor, read_spec
    from edgetl.export import bundle

    spec = read_spec(folder / bundle.PREPROCESS_FILE)
    rows: list[list[float]] = []
    for start in range(0, len(images), batch):
        x = np.stack([load_tensor(Path(p), spec) for p in images[start:start + batch]])
        rows += np.asarray(runner.infer(x)["logits"], dtype=np.float64).tolist()
    return rows


def _artifact(job: dict[str, Any]) -> tuple[Path, dict[str, Any], Any]:
    """The shipped artifact, its files checked against the manifest again (the copy is the one verified), and a
    runner of its model on the job's runtime."""
    _require("numpy", "PIL")
    from edgetl.export import bundle

    folder = Path(job["artifact"])
    manifest = bundle.verify_files(folder)
    return folder, manifest, _runner(folder / bundle.MODEL_FILE, job)


def _golden(folder: Path, manifest: dict[str, Any], runner: Any, job: dict[str, Any]) -> dict[str, Any]:
    """The golden check on the (active) runner's runtime, at the tolerance of the precision that runs."""
    from edgetl.export import golden

    precision = golden.runtime_precision(manifest, runner.backend, job.get("precision"))
    return golden.check(folder, manifest, lambda x: runner.infer(x)["logits"], precision, runner.backend)


def task_validate(job: dict[str, Any]) -> dict[str, Any]:
    """Golden check, timing, memory and the outputs on the scoring images, on the board: one session (one engine)
    for all three."""
    from edgetl.export import bundle

    folder, manifest, runner = _artifact(job)
    with runner:
        out: dict[str, Any] = {"golden": _golden(folder, manifest, runner, job)}
        out.update(_time(runner, folder / bundle.MODEL_FILE, job))
        if job.get("images"):
            out["logits"] = _logits(folder, runner, job["images"], BATCH)
    return out


def task_predict(job: dict[str, Any]) -> dict[str, Any]:
    """The artifact's outputs on the images (after the golden check with ``check``)."""
    folder, manifest, runner = _artifact(job)
    with runner:
        out: dict[str, Any] = {"golden": _golden(folder, manifest, runner, job) if job.get("check") else None}
        out["logits"] = _logits(folder, runner, job["images"], BATCH)
    return out


def task_bench(job: dict[str, Any]) -> dict[str, Any]:
    """Time an ONNX file."""
    model = Path(job["model"])
    with _runner(model, job) as runner:
        return _time(runner, model, job)


def _cached(job: dict[str, Any]) -> dict[str, Path]:
    """The job's ONNX files, by content hash, in the board's model cache (``cache``): shipped ones are moved there,
    so that a later calibration does not send them again."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / job["cache"]
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    for digest in job["models"]:
        shipped, kept = Path("models") / f"{digest}.onnx", cache / f"{digest}.onnx"
        if shipped.is_file():
            _keep(shipped, kept)
        found[digest] = kept
    return found


def _keep(shipped: Path, kept: Path) -> None:
    """Move a shipped file into the cache: renamed, or, where the cache is on another file system than the job's
    folder (``/tmp`` a tmpfs), copied under a temporary name and then renamed, so that a copy cut short is never
    taken for a cached file."""
    try:
        os.replace(str(shipped), str(kept))
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = kept.with_name(f"{kept.name}.{os.getpid()}.partial")
        shutil.copyfile(str(shipped), str(partial))
        os.replace(str(partial), str(kept))
        shipped.unlink()


def _steady_times(files: dict[str, Path], job: dict[str, Any]) -> dict[str, list[float]]:
    """Each model alone, warmed up, consecutive runs, in ``passes`` passes (as calibrate times a model here)."""
    from edgetl.runtime.bench import benchmark
    from edgetl.runtime.onnxruntime import OnnxRuntimeRunner

    times: dict[str, list[float]] = {name: [] for name in job["timed"]}
    for _ in range(int(job["passes"])):
        for name, (digest, shape) in job["timed"].items():
            runner = OnnxRuntimeRunner(files[digest], providers="cpu", threads=job.get("threads"), name=name)
            result = benchmark(runner, tuple(shape), iterations=int(job["per_pass"]), warmup=int(job["warmup"]),
                               cv_threshold=10.0)
            times[name] += list(result.times_ms)
    return times


def task_calibrate(job: dict[str, Any]) -> dict[str, Any]:
    """What ``device calibrate`` measures, measured on the board: the CPU, memory bandwidth, the BLAS rate, the
    runtime's own memory, the models' steady-state timings, their sessions' peak RSS, and FP32 against INT8 (the
    CPU is in the fingerprint that :func:`run` adds to every answer)."""
    _require("numpy", "onnxruntime")
    from edgetl.runtime.bench import (
        benchmark_interleaved,
        measure_bandwidth,
        measure_gemm_gflops,
        session_growth_mb,
        session_rss_mb,
    )
    from edgetl.runtime.onnxruntime import OnnxRuntimeRunner

    files = _cached(job)
    out: dict[str, Any] = {"bandwidth_gbs": measure_bandwidth(), "gemm_gflops": measure_gemm_gflops(),
                           "overhead_mb": session_growth_mb(files[job["tiny"]]),
                           "times_ms": _steady_times(files, job)}
    out["memory_mb"] = {name: session_rss_mb(files[digest], shape, job.get("threads"), 3)
                        for name, (digest, shape) in job["memory"].items()}
    if job.get("int8"):
        pair, shape = job["int8"]
        runners = {p: OnnxRuntimeRunner(files[d], providers="cpu", threads=job.get("threads"), name=p)
                   for p, d in pair.items()}
        results = benchmark_interleaved(runners, tuple(shape), rounds=int(job["int8_rounds"]), iterations_per_round=3,
                                        warmup=5, settle=1, cv_threshold=10.0)
        out["int8_ms"] = {p: {"min": r.min, "runs": r.iterations} for p, r in results.items()}
    return out


def task_kernels(job: dict[str, Any]) -> dict[str, Any]:
    """The kernel step of ``device calibrate`` on the board: the windows of ``plan`` (built by the host, see
    :mod:`edgetl.calibrate.kernel_plan`) run under the noise guard; ``files`` maps the plan's file keys to content
    hashes in the board's model cache. The raw timings go back to the host, which fits them."""
    _require("numpy", "onnxruntime")
    from edgetl.calibrate.profiler import run_windows

    files = _cached(job)
    return run_windows(job["plan"], lambda key: str(files[job["files"][key]]), job.get("threads"))


TASKS = {"info": lambda job: {}, "validate": task_validate, "predict": task_predict, "bench": task_bench,
         "calibrate": task_calibrate, "kernels": task_kernels}


def check_threads(threads: Any) -> None:
    """Refuse more ONNX Runtime threads than the board has cores (its fingerprint's ``cpu.cores``), as
    :func:`edgetl.options.cap_threads` caps them at this machine's on the host.

    Raises:
        ConfigError: ``threads`` is more than the board's cores.
    """
    from edgetl.device.machine import available_cores

    cores = available_cores()
    if threads is not None and int(threads) > cores:
        raise ConfigError(f"--threads {threads} is more than the board's {cores} cores ({platform.node()}): pass "
                          f"--threads {cores} or fewer, or leave it out (all its cores)")


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; every result carries the board's fingerprint (``machine``) and how long the task took there
    (``seconds``)."""
    if sys.version_info < MIN_PYTHON:
        raise BoardSetupError(f"the board's Python is {platform.python_version()}; the runner needs Python >= "
                              f"{'.'.join(map(str, MIN_PYTHON))}: pass --device-python PATH to a newer one")
    check_threads(job.get("threads"))
    start = time.monotonic()
    result = TASKS[job["task"]](job)
    result["seconds"] = time.monotonic() - start
    result["machine"] = machine_info()
    return result


def main(argv: list[str] | None = None) -> int:
    """Read the job file, run it, print the JSON answer; 0 on success, :data:`EXIT_ERROR` on an error."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="board: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    try:
        answer: dict[str, Any] = {"result": run(job)}
    except EdgetlError as exc:
        answer = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    except MemoryError:
        answer = {"error": {"type": "RemoteError", "message": "the board ran out of memory"}}
    except OSError as exc:
        answer = {"error": {"type": "RemoteError", "message": f"{exc.filename or 'the runner'}: {exc.strerror or exc}"}}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return EXIT_ERROR if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(main())
