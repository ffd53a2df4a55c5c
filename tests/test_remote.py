"""``--on ssh://HOST``: validate, bench, predict and device info on a board over SSH.

The board is a real OpenSSH server on 127.0.0.1 (started here as the current user) and a Python that has numpy,
Pillow and ONNX Runtime only (:mod:`sshboard`); no test reaches past the loopback address.
"""

import ast
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from clirun import cli_env
from PIL import Image
from sshboard import full_disk_python, loopback_board, mount_namespace_reason, skip_reason
from test_validate import artifact  # noqa: F401 (the fixture: resnet18 at 32 px, random weights, FP32)

from edgetl.board import host
from edgetl.buildfile import load_build_config
from edgetl.cli import cli
from edgetl.runtime.ssh import CONFIG_ENV, BoardAddress
from edgetl.validate import validate

pytestmark = pytest.mark.ssh

FAST = ["--iterations", "5", "--warmup", "1"]


@pytest.fixture(scope="module")
def board():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with loopback_board() as b:
        yield b


@pytest.fixture
def on(board, monkeypatch):
    """The board's flags, with the client configuration that trusts it."""
    monkeypatch.setenv(CONFIG_ENV, str(board.config))
    yield ["--on", board.url, "--device-python", str(board.python)]
    assert list(board.tmp.iterdir()) == [], "files left on the board"


@pytest.fixture(scope="module")
def data(artifact, tmp_path_factory):  # noqa: F811
    """Six small images in two class folders named like the artifact's first two labels."""
    root = tmp_path_factory.mktemp("remote-data")
    labels = json.loads((artifact.path / "labels.json").read_text())
    rng = np.random.default_rng(0)
    for name in labels[:2]:
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _board_env() -> dict:
    """The environment of the board's Python run here: without this checkout on PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_board_python_has_numpy_pillow_onnxruntime_and_no_torch_nor_edgetl(board, tmp_path):
    code = "import numpy, PIL.Image, onnxruntime\nfor m in ('torch', 'edgetl', 'pydantic', 'yaml'):\n" \
           "    try:\n        __import__(m)\n    except ImportError:\n        print('no', m)\n"
    done = subprocess.run([str(board.python), "-c", code], capture_output=True, text=True, check=True,
                          env=_board_env(), cwd=tmp_path)
    assert done.stdout.split("\n")[:-1] == ["no torch", "no edgetl", "no pydantic", "no yaml"]


def test_the_shipped_modules_import_on_the_board_and_parse_as_python_3_8(board, tmp_path):
    (tmp_path / "code.zip").write_bytes(host.code_zip())
    names = [f"edgetl.{m[:-3].replace('/', '.')}" for m in host.SHIPPED]
    code = f"import sys; sys.path.insert(0, 'code.zip'); import importlib\nfor n in {names!r}: " \
           "importlib.import_module(n)\nprint(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'pydantic', 'yaml', 'onnx')))"
    done = subprocess.run([str(board.python), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_board_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    with zipfile.ZipFile(tmp_path / "code.zip") as z:
        for name in z.namelist():
            tree = ast.parse(z.read(name).decode(), name, feature_version=(3, 8))
            calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "zip"]
            assert not [c for c in calls if c.keywords], f"{name}: zip(strict=...) needs Python 3.10"


def test_device_info_over_ssh(on):
    result = _invoke("device", "info", *on, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["python_path"] == on[-1] and info["packages"]["onnxruntime"]
    assert info["cpu"]["cores"] >= 1 and info["fingerprint"]["cpu"] == info["cpu"]["model"]
    assert info["nearest_profile"]


def test_validate_on_the_board_agrees_with_validate_here(artifact, data, on, tmp_path):  # noqa: F811
    here = validate(artifact.path, data=data, iterations=5, warmup=1, report=tmp_path / "here.json")
    result = _invoke("validate", artifact.path, "--data", data, *FAST, *on, "--report", tmp_path / "board.json",
                     "--json")
    assert result.exit_code == 0, result.output
    there = json.loads(result.output)
    assert there["golden"]["status"] == here.golden["status"] == "passed"
    assert there["accuracy"]["top1"] == here.accuracy["top1"] and there["accuracy"]["images"] == 6
    assert there["latency"]["basis"] == "measured on target" and on[1] in there["latency"]["judged_on"]
    assert there["board"]["python_path"] == on[-1] and there["memory"]["runtime_mb"] > 0
    assert json.loads((tmp_path / "board.json").read_text())["board"]["address"] == on[1]


def test_a_budget_missed_on_the_board_exits_3(artifact, on, tmp_path):  # noqa: F811
    result = _invoke("validate", artifact.path, *FAST, *on, "--max-latency-ms", "0.000001",
                     "--report", tmp_path)
    assert result.exit_code == 3, result.output
    assert "exceeds the budget" in result.output and "measured on the board" in result.output


def test_bench_an_onnx_file_on_the_board(artifact, on):  # noqa: F811
    result = _invoke("bench", artifact.path / "model.onnx", *FAST, *on, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["iterations"] == 5 and doc["p50_ms"] > 0 and doc["board"]["address"] == on[1]
    assert doc["shape"] == [1, 3, 32, 32]


def test_predict_on_the_board_gives_the_local_answer(artifact, data, on):  # noqa: F811
    images = sorted(data.rglob("*.png"))[:2]
    local = _invoke("predict", artifact.path, *images, "--top", "2", "--json")
    remote = _invoke("predict", artifact.path, *images, "--top", "2", "--check", *on, "--json")
    assert remote.exit_code == 0, remote.output
    a, b = json.loads(local.output), json.loads(remote.output)
    assert [[t["label"] for t in p["top"]] for p in a] == [[t["label"] for t in p["top"]] for p in b]
    assert [p["image"] for p in b] == [str(p) for p in images]


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_threads_on_a_board_are_checked_against_the_boards_cores_not_capped_at_this_machines(artifact, on):  # noqa: F811
    cores = len(os.sched_getaffinity(0))  # the board's: its sshd was started here
    line = _one_line_error(_invoke("bench", artifact.path / "model.onnx", *FAST, "--threads", cores + 1, *on))
    assert line == (f"error: --threads {cores + 1} is more than the board's {cores} cores ({os.uname().nodename}): "
                    f"pass --threads {cores} or fewer, or leave it out (all its cores)")


def test_a_missing_runtime_is_one_line_naming_the_package_and_leaves_nothing(artifact, board, on):  # noqa: F811
    on = [*on[:-1], str(board.bare_python)]
    line = _one_line_error(_invoke("bench", artifact.path / "model.onnx", *FAST, *on))
    assert "onnxruntime" in line and "pip install onnxruntime" in line


def test_a_full_disk_on_the_board_is_one_line_and_leaves_nothing(artifact, board, on, tmp_path):  # noqa: F811
    """The job's folder on the board is a 64 KiB tmpfs (a private mount namespace around the board's Python), so
    unpacking the job there fails with the kernel's ENOSPC."""
    reason = mount_namespace_reason(tmp_path)
    if reason:
        pytest.skip(reason)
    on = [*on[:-1], str(full_disk_python(tmp_path, board.python))]
    line = _one_line_error(_invoke("bench", artifact.path / "model.onnx", *FAST, *on))
    assert line == (f"error: the board {board.url} has no space left in its temporary folder ($TMPDIR or /tmp): "
                    "free some space on it")


def _on_board(command, artifact, data, on):  # noqa: F811
    """The arguments of ``command`` (bench, validate or predict) run on the board, cheaply."""
    images = sorted(data.rglob("*.png"))[:1]
    return {"bench": ["bench", artifact.path / "model.onnx", *FAST],
            "validate": ["validate", artifact.path, *FAST, "--report", data.parent / "unused.json"],
            "predict": ["predict", artifact.path, *images]}[command] + list(on)


@pytest.mark.parametrize("command", ["bench", "validate", "predict"])
def test_tensorrt_missing_on_the_board_is_one_line_naming_the_package(command, artifact, data, on):  # noqa: F811
    """The loopback board's Python has no tensorrt: the runner says what to install (JetPack's, not pip's)."""
    line = _one_line_error(_invoke(*_on_board(command, artifact, data, [*on, "--runtime", "tensorrt"])))
    assert f"the board's Python ({'.'.join(map(str, sys.version_info[:3]))}, {on[-1]}) cannot import tensorrt" in line
    assert "sudo apt install python3-libnvinfer" in line and "pip install" not in line


@pytest.mark.parametrize("command", ["validate", "predict"])
def test_runtime_tensorrt_without_a_board_is_one_line(command, artifact, data):  # noqa: F811
    line = _one_line_error(_invoke(*_on_board(command, artifact, data, ["--runtime", "tensorrt"])))
    assert line == ("error: --runtime tensorrt picks the runtime on a board: pass --on ssh://HOST too (on this "
                    "machine the device profile's runtime runs)")


@pytest.mark.tensorrt
def test_tensorrt_on_a_board_builds_its_engine_there(artifact, board, monkeypatch, tmp_path):  # noqa: F811
    """The board is this machine's Python (tensorrt, cuda-python and a GPU) behind the loopback sshd: it builds the
    engine from the ONNX file it is sent, times it, and reproduces the golden outputs at the engine's tolerance."""
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("needs cuda-python (the board runner's CUDA buffers)")
    monkeypatch.setenv(CONFIG_ENV, str(board.config))
    on = ["--on", board.url, "--device-python", sys.executable, "--runtime", "tensorrt"]
    result = _invoke("bench", artifact.path / "model.onnx", *FAST, *on, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["runtime"] == "tensorrt" and doc["precision"] == "fp16" and doc["backend"] == "tensorrt"
    assert doc["iterations"] == 5 and doc["p50_ms"] > 0 and doc["board"]["packages"]["tensorrt"]
    result = _invoke("validate", artifact.path, *FAST, *on, "--report", tmp_path / "board.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "board.json").read_text())
    assert report["runtime"] == report["latency"]["runtime"] == "tensorrt"
    assert report["golden"]["status"] == "passed" and report["golden"]["runtime"] == "tensorrt"
    assert report["memory"]["runtime_mb"] is None and report["board"]["address"] == board.url
    assert list(board.tmp.iterdir()) == []


def test_a_missing_interpreter_is_one_line(artifact, on):  # noqa: F811
    line = _one_line_error(_invoke("bench", artifact.path / "model.onnx", *FAST, *on[:-1], "/nonexistent"))
    assert "/nonexistent" in line and "--device-python" in line


def test_an_unknown_host_key_is_refused_saying_how_to_trust_it(board, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(board.untrusted_config))
    line = _one_line_error(_invoke("device", "info", "--on", board.url, "--device-python", board.python))
    assert "host key" in line and "unknown" in line and "--accept-new-host-key" in line
    assert f"ssh -p {BoardAddress.parse(board.url).port} 127.0.0.1" in line


def test_an_unreachable_board_is_one_line(board, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(board.config))
    with __import__("socket").socket() as s:  # a port nobody listens on: bound here, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        line = _one_line_error(_invoke("device", "info", "--on", f"ssh://127.0.0.1:{port}"))
    assert "cannot reach" in line


def test_a_bad_address_is_one_line():
    line = _one_line_error(_invoke("device", "info", "--on", "pi@raspberrypi"))
    assert "ssh://" in line


def test_a_refused_key_is_one_line(board, monkeypatch, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    config = tmp_path / "ssh_config"
    config.write_text(board.config.read_text().replace(str(board.config.parent / "client_key"), str(other)))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    line = _one_line_error(_invoke("device", "info", "--on", board.url))
    assert "refused the authentication" in line and "ssh-add" in line


def _start_long_bench(artifact, board, on):  # noqa: F811
    """A bench on the board that runs until stopped, from a fresh CLI process; its board folder once it runs."""
    env = {**cli_env(), CONFIG_ENV: str(board.config)}
    before = set(board.tmp.iterdir())  # a folder left by another test is not this bench's
    proc = subprocess.Popen([sys.executable, "-m", "edgetl", "bench", str(artifact.path / "model.onnx"),
                             "--iterations", "1000000", "--warmup", "0", *on], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(board.tmp.iterdir()) - before
        folders = [d for d in new if (d / ".pid").is_file() and (d / "job.json").is_file()]
        runners = [p for d in folders for p in _children(int((d / ".pid").read_text()))
                   if b"edgetl.board.runner" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if runners:
            return proc, runners[0]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the runner did not start on the board")


def _interruptible() -> None:
    """Ctrl-C reaches the CLI however the suite was started: a shell without job control starts a background
    command with SIGINT ignored, and an ignored signal stays ignored across exec (Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    """The CLI's output once it exits; killed, with what it printed so far in the failure, if it has not in 60 s."""
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI did not exit within 60 s; it printed: {out!r} {err!r}") from None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the board is this machine)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_stops_the_runner_and_removes_the_board_folder(artifact, board, on):  # noqa: F811
    proc, runner = _start_long_bench(artifact, board, on)
    proc.send_signal(signal.SIGINT)
    _, err = _finish(proc)
    assert proc.returncode != 0, err
    assert _gone(runner), "the runner still runs on the board"


def test_a_runner_killed_on_the_board_is_one_line(artifact, board, on):  # noqa: F811
    proc, runner = _start_long_bench(artifact, board, on)
    os.kill(runner, signal.SIGKILL)
    _, err = _finish(proc)
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == [f"error: the runner was killed on {board.url} by SIGKILL (out of memory?)"]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_dropped_connection_stops_the_runner_and_removes_its_folder(artifact, board, on):  # noqa: F811
    """The host is gone (killed: it cannot clean up) and the board's SSH session dies: the board's shell stops the
    runner and removes its folder on its own."""
    proc, runner = _start_long_bench(artifact, board, on)
    folder, session = Path(os.readlink(f"/proc/{runner}/cwd")), _parent(_parent(runner))
    assert folder.parent == board.tmp and b"@" in Path(f"/proc/{session}/cmdline").read_bytes()  # sshd: user@notty
    sockets = {a.split("=", 1)[1].rsplit("/", 1)[0] for c in _children(proc.pid)
               for a in Path(f"/proc/{c}/cmdline").read_text().split("\0") if a.startswith("-oControlPath=")}
    proc.kill()
    proc.communicate(timeout=60)
    os.kill(session, signal.SIGKILL)
    try:
        assert _gone(runner, timeout=30), "the runner still runs on the board"
        deadline = time.monotonic() + 30
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not folder.exists(), "the runner's folder is left on the board"
    finally:
        for path in sockets:  # the control socket's folder of the killed CLI (its master exits with the connection)
            shutil.rmtree(path, ignore_errors=True)


def test_a_build_file_takes_on_in_its_validate_section(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "pipeline.yaml").write_text("device: x86-avx2\ndata: data\nmodel: resnet18\n"
                                            "validate: {on: ssh://pi@raspberrypi.local, device_python: python3.11}\n")
    config = load_build_config(tmp_path / "pipeline.yaml")
    assert (config.validate_.on, config.validate_.device_python) == ("ssh://pi@raspberrypi.local", "python3.11")


def test_accept_new_host_key_trusts_a_new_board_once(board, monkeypatch, tmp_path):
    known = tmp_path / "known_hosts"
    config = tmp_path / "ssh_config"
    config.write_text(board.untrusted_config.read_text().replace(
        str(board.untrusted_config.parent / "empty_known_hosts"), str(known)))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    result = _invoke("device", "info", "--on", board.url, "--device-python", board.python, "--accept-new-host-key")
    assert result.exit_code == 0, result.output
    assert "127.0.0.1" in known.read_text()
    assert _invoke("device", "info", "--on", board.url, "--device-python", board.python).exit_code == 0


TINY = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5")  # test_calibrate's: cached ONNX


@pytest.mark.slow
def test_calibrate_on_the_board_times_its_kernels_fits_its_profile_and_sends_no_file_twice(board, on, tmp_path):
    from edgetl.board.calibrate import calibrate_on_board, measure_board
    from edgetl.board.jobs import Remote

    remote = Remote(board.url, board.python)
    kernels = {"kernel_samples": 6, "kernel_models": TINY}
    result, sent = calibrate_on_board(remote, "loop-board", tmp_path / "loop-board.yaml", models=TINY, rounds=3,
                                      resolution=64, threads=1, **kernels)
    # the models, the one-ReLU model, resnet18 in INT8; then the kernel step's own files: the noise guard's reference,
    # the channel-block probe, the one-ReLU run, the streaming product, 6 pairs of profiler chains, the micro-graphs
    assert sent.files > len(TINY) + 2 + 4 + 12
    assert 0 < sent.board_s < sent.jobs_s
    profile = result.profile
    assert {r.model for r in profile.reference} == set(TINY) and profile.calibrated["threads"] == 1
    assert profile.int8_speedup is not None and "--on" in profile.int8_speedup.derived
    assert profile.memory.rss_fit is not None
    assert profile.calibrated["fingerprint"]["cpu"] == profile.cpu.model
    # the kernel model was fitted to kernels timed on the board under its noise guard, as a local calibration's
    k = profile.kernels
    assert k is not None and k.threads == 1 and k.block in (1, 8, 16) and k.stream_gbs > 0 and len(k.samples) > 20
    assert "edgetl device calibrate --on with ONNX Runtime's profiler" in k.derived
    noise = result.noise
    assert noise is not None and noise.windows >= 6 + len(TINY) + 2 and noise.reference_us > 0
    assert f"coefficient of variation {noise.cv:.3f}" in k.derived
    measured = measure_board(remote, TINY[:1], threads=1, rounds=1, resolution=64, int8=False, **kernels)
    assert measured.transfer.files == 0  # every model and micro-graph is in the board's cache
    assert measured.kernels is not None and measured.kernels[1]["windows"]["model resnet18"]


def test_the_board_cache_takes_shipped_models_from_another_file_system(tmp_path):
    """On a board whose /tmp is a tmpfs, the job's folder and the model cache (~/.cache) are on different file
    systems, where a rename fails (EXDEV): the shipped file is copied into the cache instead."""
    reason = mount_namespace_reason(tmp_path)
    if reason:
        pytest.skip(reason)
    job, cache = tmp_path / "job", tmp_path / "cache"
    (job / "models").mkdir(parents=True)
    cache.mkdir()
    (job / "models" / "abc.onnx").write_bytes(b"model bytes")
    script = ("from edgetl.board.runner import _cached; "
              "print(_cached({'cache': 'edgetl/board-models', 'models': ['abc']})['abc'].read_text())")
    shell = (f"mount -t tmpfs -o size=1m tmpfs {cache} && XDG_CACHE_HOME={cache} {sys.executable} -c \"{script}\" "
             f"&& ls {cache}/edgetl/board-models")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=job, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["model", "bytes", "abc.onnx"]  # read back from the cache; no partial file left
    assert not (job / "models" / "abc.onnx").exists()
