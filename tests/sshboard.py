"""A board on the loopback address for the ``--on ssh://`` tests and benchmarks: a real OpenSSH server started as
the current user, a client configuration of its own (never the user's ~/.ssh), and a "board" Python that can
import numpy, Pillow and ONNX Runtime and nothing else of this environment (no torch, no edgetl)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
KEYGEN = "ssh-keygen"
#: What the board's Python may import from this environment (top-level modules, with their data folders).
BOARD_MODULES = ("numpy", "PIL", "onnxruntime")


@dataclass
class LoopbackBoard:
    """A running sshd on 127.0.0.1 and how to reach it.

    Attributes:
        url: ``ssh://127.0.0.1:PORT``.
        config: the client configuration (``EDGETL_SSH_CONFIG``): the key, a known_hosts that trusts the server.
        untrusted_config: the same, with an empty known_hosts.
        tmp: the board's temporary folder ($TMPDIR of its sessions).
        python: the board's Python (numpy, Pillow and ONNX Runtime only).
        bare_python: a Python with numpy and Pillow but no ONNX Runtime.
    """

    url: str
    config: Path
    untrusted_config: Path
    tmp: Path
    python: Path
    bare_python: Path


def skip_reason() -> str | None:
    """Why no loopback board can run here, or None."""
    if not SSHD.exists():
        return f"{SSHD} is missing (install openssh-server; .ci/run does)"
    if shutil.which(KEYGEN) is None or not Path("/usr/bin/ssh").exists():
        return "the OpenSSH client (ssh, ssh-keygen) is missing"
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        with contextlib.suppress(OSError):
            Path("/run/sshd").mkdir(mode=0o755)  # sshd started by root needs its privilege-separation folder
        if not Path("/run/sshd").is_dir():
            return "sshd run as root needs /run/sshd, which cannot be made"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _write_configs(root: Path, port: int) -> tuple[Path, Path]:
    host_pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (root / "empty_known_hosts").write_text("")
    configs = []
    for name, known in (("ssh_config", "known_hosts"), ("untrusted_ssh_config", "empty_known_hosts")):
        path = root / name
        path.write_text(f"Host *\n  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
                        f"  UserKnownHostsFile {root / known}\n  GlobalKnownHostsFile /dev/null\n"
                        "  PasswordAuthentication no\n")
        configs.append(path)
    return configs[0], configs[1]


def _sshd_config(root: Path, port: int, board_tmp: Path) -> Path:
    path = root / "sshd_config"
    path.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
        f"AuthorizedKeysFile {root / 'client_key.pub'}", f"PidFile {root / 'sshd.pid'}",
        "UsePAM no", "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "LogLevel ERROR",
        f"SetEnv TMPDIR={board_tmp} XDG_CACHE_HOME={root / 'board-cache'}", "MaxStartups 50", "MaxSessions 50", ""]))
    return path


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")


def board_python(root: Path, modules: tuple[str, ...]) -> Path:
    """A venv (no pip) whose only third-party modules are ``modules``, linked from this environment."""
    venv = root / f"venv-{len(modules)}"
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    exposed = venv / "board-site"
    exposed.mkdir()
    for name in modules:
        origin = Path(importlib.util.find_spec(name).origin).parent
        site = origin.parent
        (exposed / name).symlink_to(origin)
        extra = [p for p in site.iterdir() if p.name.lower().startswith((name.lower() + "-", name.lower() + "."))]
        if name == "PIL":
            extra += [p for p in site.iterdir() if p.name.lower().startswith(("pillow-", "pillow."))]
        for path in extra:
            (exposed / path.name).symlink_to(path)
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    (site_packages / "board.pth").write_text(str(exposed) + "\n")
    return venv / "bin" / "python"


@contextlib.contextmanager
def loopback_board() -> Iterator[LoopbackBoard]:
    """Start sshd on a free port of 127.0.0.1 with generated keys; stop it and remove everything at the end."""
    root = Path(tempfile.mkdtemp(prefix="edgetl-sshd-", dir="/tmp"))  # short: sockets and sshd paths
    proc = None
    try:
        _keygen(root / "host_key")
        _keygen(root / "client_key")
        port = _free_port()
        board_tmp = root / "board-tmp"
        board_tmp.mkdir()
        config, untrusted = _write_configs(root, port)
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(_sshd_config(root, port, board_tmp))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(port)
        yield LoopbackBoard(f"ssh://127.0.0.1:{port}", config, untrusted, board_tmp,
                            board_python(root, BOARD_MODULES), board_python(root, ("numpy", "PIL")))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def full_disk_python(folder: Path, python: Path) -> Path:
    """A ``--device-python`` for a board whose disk is full: ``python`` run in a private mount namespace (nothing
    outside it sees the mount) where the folder it starts in is a new 64 KiB tmpfs. The first Python the board's
    shell runs is the unpacking of the job into its ``mktemp -d`` folder: there, a job larger than 64 KiB meets the
    kernel's ENOSPC."""
    wrapper = folder / "full-disk-python"
    wrapper.write_text("#!/bin/sh\nexec unshare -rm sh -c 'mount -t tmpfs -o size=64k tmpfs \"$PWD\" && "
                       f"cd \"$PWD\" && exec \"$0\" \"$@\"' {shlex.quote(str(python))} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def mount_namespace_reason(folder: Path) -> str | None:
    """Why a private mount namespace with a tmpfs cannot be made here (no ``unshare``, or user or mount namespaces
    not permitted), or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    target = folder / "mount-probe"
    target.mkdir(exist_ok=True)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {target}"],
                          capture_output=True, text=True)
    target.rmdir()
    if done.returncode != 0:
        return f"no private mount namespace here (`unshare -rm` then `mount -t tmpfs`: {done.stderr.strip()})"
    return None
