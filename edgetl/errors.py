"""Errors that edgetl raises for problems the user can fix.

Every :class:`EdgetlError` carries a one-line message that says what is wrong and how to fix it.
The CLI prints that message and exits with :attr:`EdgetlError.exit_code` (1, or 3 for a missed
budget) without a traceback.
"""

from __future__ import annotations

import difflib
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
