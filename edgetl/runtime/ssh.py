"""A board over SSH (``--on ssh://[user@]host[:port]``), through the system OpenSSH client.

edgetl runs ``/usr/bin/ssh`` rather than a Python SSH library so that a board is reached exactly as ``ssh HOST``
reaches it: ``~/.ssh/config`` (host aliases, ports, keys, ``ProxyJump``), the agent and ``known_hosts``. On top of
the user's configuration it sets:

- ``BatchMode=yes``: never a password prompt (a key in the agent or an ``IdentityFile`` is needed);
- ``StrictHostKeyChecking=yes``: an unknown or changed host key is refused (``accept-new`` when the user opts in);
- one connection per :class:`Board` session (``ControlMaster``), reused by every command; its socket lives in a
  short private folder under ``/tmp`` (a Unix socket path is limited to about 100 characters).

``$EDGETL_SSH_CONFIG`` names another client configuration file (``ssh -F``).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from edgetl.errors import ConfigError, HostKeyError, RemoteError

log = logging.getLogger(__name__)

SSH = "/usr/bin/ssh"
CONFIG_ENV = "EDGETL_SSH_CONFIG"
CONNECT_TIMEOUT_S = 15
IDLE_PERSIST_S = 120
"""Seconds the shared connection outlives its last command, should edgetl be killed before closing it."""


@dataclass(frozen=True)
class BoardAddress:
    """Where a board is: ``ssh://[user@]host[:port]`` (host may be an alias of ``~/.ssh/config``)."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> BoardAddress:
        """Parse ``ssh://[user@]host[:port]``.

        Raises:
            ConfigError: not an ``ssh://`` address.
        """
        text = str(url).strip()
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "ssh" or not parts.hostname or port == -1 or parts.path not in ("", "/") \
                or parts.query or parts.password:
            raise ConfigError(f"--on {text!r}: expected ssh://[user@]host[:port], e.g. ssh://pi@raspberrypi.local")
        return cls(host=parts.hostname, user=parts.username or None, port=port)

    @property
    def target(self) -> str:
        """``[user@]host``, as ``ssh`` takes it."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"ssh://{self.target}{port}"


def ssh_available() -> bool:
    """Whether the OpenSSH client is installed."""
    return os.access(SSH, os.X_OK)


class Board:
    """One SSH connection to a board, shared by the commands run through it (a context manager).

    Args:
        url: ``ssh://[user@]host[:port]``.
        accept_new_host_key: trust a host key seen for the first time (``StrictHostKeyChecking=accept-new``);
            a changed key is refused all the same.
    """

    def __init__(self, url: str, accept_new_host_key: bool = False) -> None:
        self.address = BoardAddress.parse(url)
        self.accept_new_host_key = accept_new_host_key
        self._control_dir: str | None = None

    def __enter__(self) -> Board:
        if not ssh_available():
            raise RemoteError(f"--on needs the OpenSSH client at {SSH}; install it (Debian: apt-get install "
                              "openssh-client)")
        self._control_dir = tempfile.mkdtemp(prefix="edgetl-ssh-", dir="/tmp")
        try:
            done = subprocess.run([*self._ssh("-M", "-N", "-f", f"-oControlPersist={IDLE_PERSIST_S}")],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                                  timeout=CONNECT_TIMEOUT_S * 4)
        except subprocess.TimeoutExpired:
            self._close()
            raise RemoteError(f"cannot reach {self.address}: no answer in {CONNECT_TIMEOUT_S * 4} s") from None
        if done.returncode != 0:
            self._close()
            raise self.connection_error(done.stderr)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._control_dir is None:
            return
        subprocess.run(self._ssh("-O", "exit"), capture_output=True, check=False, timeout=30)
        shutil.rmtree(self._control_dir, ignore_errors=True)
        self._control_dir = None

    def _ssh(self, *extra: str) -> list[str]:
        """The ssh command line up to the host (``extra`` options before it)."""
        cmd = [SSH]
        config = os.environ.get(CONFIG_ENV)
        if config:
            cmd += ["-F", config]
        checking = "accept-new" if self.accept_new_host_key else "yes"
        cmd += ["-oBatchMode=yes", f"-oStrictHostKeyChecking={checking}", f"-oConnectTimeout={CONNECT_TIMEOUT_S}",
                "-oServerAliveInterval=15", "-oServerAliveCountMax=4", "-oLogLevel=ERROR",
                f"-oControlPath={self._control_dir}/%C", *extra]
        if self.address.port:
            cmd += ["-p", str(self.address.port)]
        return [*cmd, "--", self.address.target]

    def run(self, script: str, stdin: IO[bytes] | None = None, timeout: float | None = None,
            ) -> subprocess.CompletedProcess:
        """Run a POSIX shell ``script`` on the board through the shared connection; stdout and stderr are bytes.

        The login shell execs ``sh``, so that the script's parent (``$PPID``) is the SSH session process.

        Raises:
            RemoteError: ssh itself failed (exit 255: the connection dropped, or the board refused it).
        """
        if self._control_dir is None:
            raise RuntimeError("Board.run outside its `with` block")
        cmd = [*self._ssh("-oControlMaster=no"), "exec sh -c " + shlex.quote(script)]
        done = subprocess.run(cmd, stdin=stdin if stdin is not None else subprocess.DEVNULL, capture_output=True,
                              check=False, timeout=timeout)
        if done.returncode == 255:
            raise self.connection_error(done.stderr.decode(errors="replace"))
        return done

    def connection_error(self, stderr: str) -> RemoteError:
        """One line for what ssh said when it could not connect or run a command."""
        return connection_error(stderr, self.address)


_UNREACHABLE = ("Connection refused", "Could not resolve hostname", "No route to host", "timed out",
                "Network is unreachable", "Connection closed", "Connection reset", "kex_exchange_identification",
                "Name or service not known")


def connection_error(stderr: str, address: BoardAddress) -> RemoteError:
    """Map ssh's complaint to one line that says what to do."""
    host, target = address.host, address.target
    port = f" -p {address.port}" if address.port else ""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or ("Host key for" in stderr and "has changed" in stderr):
        return HostKeyError(
            f"the host key of {host} has changed since it was trusted (a reinstalled board, or someone in between): "
            f"if the board is yours and was reinstalled, forget the old key with `ssh-keygen -R {host}`, then "
            f"check and accept the new one with `ssh{port} {target}`")
    if "Host key verification failed" in stderr or re.search(r"No \S+ host key is known", stderr):
        return HostKeyError(
            f"the host key of {host} is unknown (strict host-key checking): trust the board by connecting once with "
            f"`ssh{port} {target}` and checking the fingerprint it shows, or pass --accept-new-host-key")
    if "Permission denied" in stderr or "Too many authentication failures" in stderr:
        return RemoteError(
            f"{target} refused the authentication: load your key into the agent (`ssh-add`) or name it with "
            f"IdentityFile in ~/.ssh/config, and check `ssh{port} {target}` logs in without a password")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else "ssh exited with status 255"
    if any(word in stderr for word in _UNREACHABLE):
        return RemoteError(f"cannot reach {address}: {reason}")
    return RemoteError(f"ssh to {address} failed: {reason}")
