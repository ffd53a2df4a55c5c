"""Errors that edgetl raises for problems the user can fix.

Every :class:`EdgetlError` carries a one-line message that says what is wrong and how to fix it.
The CLI prints that message and exits with :attr:`EdgetlError.exit_code` (1, or 3 for a missed
budget) without a traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class EdgetlError(Exception):
    """A user error: bad input, a missing file, an impossible request."""

    exit_code: int = 1


class UnknownNameError(EdgetlError, KeyError):
    """A model, device or other name that does not exist; the message suggests the closest names."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = "") -> None:
        self.kind = kind
        self.name = name
        self.suggestions = did_you_mean(name, choices)
        msg = f"unknown {kind} '{name}'"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(f"'{s}'" for s in self.suggestions) + "?"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class ProfileError(EdgetlError):
    """A device profile that is missing, malformed, or asked for something the device cannot do."""


class ConstraintError(EdgetlError):
    """Constraints that no candidate can meet, or that contradict each other."""


class DataError(EdgetlError):
    """A dataset that cannot be used: no images, an empty class, a single class, a corrupt file."""


class WeightsError(EdgetlError):
    """Pretrained weights that cannot be found or loaded."""


class CheckpointError(EdgetlError):
    """A run directory or checkpoint that is missing, incomplete or inconsistent."""


class TrainingError(EdgetlError):
    """Training that cannot go on: the loss became NaN or infinite.

    Attributes:
        epoch: the epoch (1-based) whose step gave the non-finite loss.
        step: the step (1-based) within that epoch.
    """

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch = epoch
        self.step = step
        super().__init__(message)


class ExportError(EdgetlError):
    """A model that cannot be exported, converted or quantized."""


class BackendUnavailableError(EdgetlError):
    """An optional backend (CUDA, TensorRT, an ONNX Runtime provider) that is not installed here."""


class ArtifactError(EdgetlError):
    """An artifact folder that is incomplete or whose files do not match their recorded hashes."""


class ConfigError(EdgetlError):
    """A build file or option set that is invalid."""


class BudgetExceededError(EdgetlError):
    """Validation ran, and a budget (latency, memory, accuracy drop) was missed. Exit code 3."""

    exit_code = 3


class RemoteError(EdgetlError):
    """A board reached over SSH (``--on ssh://HOST``) that cannot be used: unreachable, refused, untrusted, or its
    runner failed."""


class HostKeyError(RemoteError):
    """The board's SSH host key is unknown or has changed (strict host-key checking)."""


class BoardSetupError(RemoteError):
    """The board lacks what the runner needs: its Python interpreter, numpy, Pillow or the runtime."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` names from ``choices`` that are closest to ``name``."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    found = [lowered[c] for c in close]
    if len(found) < n:
        prefix = [c for c in choices if c.lower().startswith(name.lower()) and c not in found]
        found += prefix[: n - len(found)]
    return found


class TrainingInterrupted(EdgetlError):
    """Training stopped by Ctrl-C (SIGINT); the last finished epoch is checkpointed. Exit code 130."""

    exit_code = 130

    def __init__(self, epochs_done: int, epochs_total: int, hint: str = "") -> None:
        self.epochs_done = epochs_done
        self.epochs_total = epochs_total
        msg = f"training interrupted after epoch {epochs_done} of {epochs_total}"
        super().__init__(f"{msg}; {hint}" if hint else msg)


_OS_FIXES = {
    "ENOSPC": ("no space left on the device", "free some space or choose a folder on another disk"),
    "EDQUOT": ("disk quota exceeded", "free some space or choose a folder on another disk"),
    "EROFS": ("read-only file system", "choose a writable folder"),
    "EACCES": ("permission denied", "check its permissions or choose a writable folder"),
    "EPERM": ("operation not permitted", "check its permissions or choose a writable folder"),
    "ENOTDIR": ("a part of the path is a file, not a folder", "choose a path whose parent folders are folders"),
}


def os_error_message(exc: OSError) -> str | None:
    """One line for an OS error a user can fix (full disk, read-only, permission, not a folder), or None.

    Args:
        exc: the error, usually raised by a write under an output folder or the cache.

    Returns:
        ``PATH: what went wrong; the fix`` for the errors listed in ``_OS_FIXES``, else None.
    """
    name = errno.errorcode.get(exc.errno or -1, "")
    if name == "EEXIST" and exc.filename is not None and not os.path.isdir(exc.filename):
        # Path.mkdir(exist_ok=True) on a path, or a parent, that is a file
        return f"{exc.filename}: is a file, not a folder; choose a path whose parent folders are folders"
    if name not in _OS_FIXES:
        return None
    what, fix = _OS_FIXES[name]
    path = exc.filename if exc.filename is not None else "a file edgetl was writing"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {what}; {fix}"
