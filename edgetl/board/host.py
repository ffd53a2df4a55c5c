"""The host side of ``--on ssh://HOST``: ship the runner, a job and its files to a temporary folder on the board, run
it there, bring back its JSON answer, and leave nothing behind.

What is shipped: a zip of the torch-free modules the runner reuses (:data:`SHIPPED`, with minimal package
``__init__`` files), put on the board's ``sys.path``; ``job.json``; and the job's files (an artifact, images, an
ONNX file). They travel as one tar stream on ssh's stdin, unpacked by the board's Python into ``mktemp -d``. The
folder is removed by the board's shell when the runner ends, and again by the host after every job (whatever
happened: an error, Ctrl-C), which also stops a runner still running. When the host cannot (the connection
dropped), the board's shell stops the runner itself within seconds of its SSH session's end, and removes the folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import shlex
import signal
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgetl import errors
from edgetl.errors import BoardSetupError, RemoteError
from edgetl.runtime.ssh import Board

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]

#: The modules the board runner imports (paths under ``edgetl/``): torch-, pydantic- and yaml-free at import time.
SHIPPED: tuple[str, ...] = (
    "errors.py", "_io.py", "folders.py", "data/decode.py", "data/preprocess.py", "export/bundle.py",
    "export/golden.py", "runtime/base.py", "runtime/bench.py", "runtime/onnxruntime.py", "runtime/tensorrt_core.py",
    "device/machine.py", "calibrate/noise.py", "calibrate/profiler.py", "board/runner.py",
)
EXIT_NO_PYTHON = 91
EXIT_UNPACK = 92
EXIT_NO_TEMP = 93
RUNNER_ERROR = 3
DEFAULT_PYTHON = "python3"


def code_zip() -> bytes:
    """The runner and the modules it reuses, as a zip importable from ``sys.path`` (package ``edgetl``)."""
    from edgetl import __version__

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("edgetl/__init__.py", f'"""edgetl\'s board runner."""\n__version__ = "{__version__}"\n')
        for package in sorted({str(Path(m).parent) for m in SHIPPED if "/" in m}):
            z.writestr(f"edgetl/{package}/__init__.py", "")
        for module in SHIPPED:
            z.write(PACKAGE / module, f"edgetl/{module}")
    return buf.getvalue()


def _script(python: str, token: str) -> str:
    """The board's shell script: a private temporary folder, removed on exit; unpack stdin there; run the job.

    The runner's own temporary files go there too (``TMPDIR``): importing ONNX Runtime writes ``$TMPDIR/.ses``.
    A watchdog (:data:`_WATCHDOG`) stops the runner when the SSH session that started it is gone; SIGPIPE is
    ignored so that the shell, which reports a killed job on its stderr (gone with the session), lives on to remove
    the folder.
    """
    py = '"$HOME"/' + shlex.quote(python[2:]) if python.startswith("~/") else shlex.quote(python)
    return f"""
p=$PPID
d=$(mktemp -d "${{TMPDIR:-/tmp}}/edgetl-{token}-XXXXXX") || exit {EXIT_NO_TEMP}
trap 'rm -rf "$d"' EXIT
trap 'exit 130' INT TERM HUP
trap '' PIPE
echo $$ > "$d/.pid"
command -v {py} >/dev/null 2>&1 || exit {EXIT_NO_PYTHON}
cd "$d" || exit {EXIT_NO_TEMP}
{py} -c 'import sys, tarfile
t = tarfile.open(fileobj=sys.stdin.buffer, mode="r|")
t.extractall(".", **({{"filter": "data"}} if hasattr(tarfile, "data_filter") else {{}}))' || exit {EXIT_UNPACK}
TMPDIR="$d" PYTHONPATH="$d/code.zip" {py} -m edgetl.board.runner job.json &
r=$!
echo $r > "$d/.runner"
{_WATCHDOG} </dev/null >/dev/null 2>&1 &
w=$!
wait $r
s=$?
kill $w 2>/dev/null
exit $s
"""


#: The board shell's watchdog, a background subshell (POSIX sh, busybox too): every second, while the runner ``$r``
#: runs, check that the shell's parent, the SSH session process (``$p``, recorded at start; ``exec sh`` makes it the
#: session's), is still its parent; once not (the connection dropped, the session was killed), stop the runner, and
#: the shell's EXIT trap removes the folder. On Linux, ``/proc/$$/stat`` tells whether the shell was reparented
#: (immune to a reused pid and to a session process of another user); elsewhere ``kill -0``.
_WATCHDOG = """(
  gone() {
    if [ -r /proc/$$/stat ]; then
      read -r s < /proc/$$/stat; set -- ${s##*") "}; [ "$2" != "$p" ]
    else
      ! kill -0 "$p" 2>/dev/null
    fi
  }
  while kill -0 "$r" 2>/dev/null; do
    sleep 1
    if gone; then
      kill -TERM "$r" 2>/dev/null; sleep 5; kill -KILL "$r" 2>/dev/null; exit 0
    fi
  done
)"""


def _cleanup_script(token: str) -> str:
    """Stop a runner still running for this job and remove its folder (after Ctrl-C or a dropped connection)."""
    return f"""
for d in "${{TMPDIR:-/tmp}}"/edgetl-{token}-*; do
  [ -d "$d" ] || continue
  for f in .runner .pid; do [ -f "$d/$f" ] && kill -TERM "$(cat "$d/$f")" 2>/dev/null; done
  rm -rf "$d"
done
exit 0
"""


def _bundle(job: Mapping[str, Any], files: Mapping[str, Path], out: Any) -> None:
    """Write the tar stream: ``code.zip``, ``job.json`` and ``files`` (archive name -> local path)."""
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("code.zip", code_zip()), ("job.json", json.dumps(dict(job)).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
        for name, path in files.items():
            tar.add(str(path), arcname=name, recursive=False)
    out.seek(0)


def run_job(board: Board, job: Mapping[str, Any], files: Mapping[str, Path] | None = None,
            python: str = DEFAULT_PYTHON) -> dict[str, Any]:
    """Run one job of :mod:`edgetl.board.runner` on ``board`` and return its result.

    Args:
        board: an open :class:`~edgetl.runtime.ssh.Board`.
        job: the job (``task`` and its arguments; paths relative to the board's temporary folder).
        files: what to ship: archive name -> local file.
        python: the board's interpreter.

    Raises:
        RemoteError: the board lacks Python or a package, its disk is full, the runner was killed, or the runner
            raised an edgetl error (raised here as the same class).
    """
    token = secrets.token_hex(6)
    try:
        with tempfile.TemporaryFile() as stream:
            _bundle(job, files or {}, stream)
            done = board.run(_script(python, token), stdin=stream)
    finally:
        board.run(_cleanup_script(token))
    return _answer(done, python, board)


def _answer(done: Any, python: str, board: Board) -> dict[str, Any]:
    """The runner's result, or the one-line error its exit status, stdout and stderr mean."""
    stderr = done.stderr.decode(errors="replace")
    for line in stderr.splitlines():
        if line.strip():
            log.info("board: %s", line)
    if done.returncode in (0, RUNNER_ERROR):
        doc = _last_json(done.stdout.decode(errors="replace"))
        if doc is not None and "result" in doc:
            return doc["result"]
        if doc is not None and "error" in doc:
            message = str(doc["error"].get("message", "the runner failed"))
            if _disk_full(message):  # the runner's own write (an OSError it reports with the file's name)
                raise RemoteError(f"the board {board.address} has no space left ({message}): free some space on it")
            raise _error_class(doc["error"].get("type"))(message)
    raise _failure(done.returncode, stderr, python, board)


def _disk_full(text: str) -> bool:
    return "No space left on device" in text or "Disk quota exceeded" in text


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _error_class(name: Any) -> type[errors.EdgetlError]:
    if name == "GoldenMismatchError":
        from edgetl.export.golden import GoldenMismatchError

        return GoldenMismatchError
    found = getattr(errors, str(name), None)
    return found if isinstance(found, type) and issubclass(found, errors.EdgetlError) else RemoteError


def _failure(rc: int, stderr: str, python: str, board: Board) -> RemoteError:
    where = board.address
    if _disk_full(stderr):
        return RemoteError(f"the board {where} has no space left in its temporary folder ($TMPDIR or /tmp): free "
                           "some space on it")
    if rc == EXIT_NO_PYTHON:
        return BoardSetupError(f"{python!r} is not an interpreter on {where}: install Python 3 on the board "
                               "(`sudo apt install python3`) or pass --device-python PATH")
    if rc == EXIT_NO_TEMP:
        return RemoteError(f"cannot make a temporary folder on {where}: {_last_line(stderr)}")
    if rc == EXIT_UNPACK:
        return RemoteError(f"cannot unpack the job on {where}: {_last_line(stderr)}")
    if rc > 128 and rc - 128 in _SIGNALS:
        return RemoteError(f"the runner was killed on {where} by {_SIGNALS[rc - 128]}"
                           + (" (out of memory?)" if rc - 128 == signal.SIGKILL else ""))
    return RemoteError(f"the runner failed on {where} (exit status {rc}): {_last_line(stderr)}")


_SIGNALS = {int(s): s.name for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGABRT,
                                     signal.SIGBUS, signal.SIGINT, signal.SIGHUP)}


def _last_line(text: str) -> str:
    lines = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def artifact_files(folder: Path, prefix: str = "artifact") -> dict[str, Path]:
    """An artifact's files to ship (all but ``validation.json``, which validate writes), by archive name."""
    return {f"{prefix}/{p.name}": p for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "validation.json"}


def image_files(paths: list[Path], prefix: str = "images") -> dict[str, Path]:
    """Images to ship under unique archive names (``images/00003.png``), in order."""
    return {f"{prefix}/{i:05d}{Path(p).suffix.lower()}": Path(p) for i, p in enumerate(paths)}


def python_path(python: str | os.PathLike[str] | None) -> str:
    """The board's interpreter: ``--device-python`` (a name on the board's PATH, an absolute path, or ``~/...`` in
    the board user's home) or ``python3``."""
    return str(python) if python else DEFAULT_PYTHON
