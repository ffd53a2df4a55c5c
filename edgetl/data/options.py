"""The choices of the data options, and the check that rejects any other value."""

from __future__ import annotations

from collections.abc import Sequence

from edgetl.errors import UnknownNameError
from edgetl.options import AUGMENTATIONS, ON_BAD_IMAGE

__all__ = ["AUGMENTATIONS", "CHECKS", "ON_BAD_IMAGE", "check_choice"]

CHECKS = ("auto", "full", "header", "none")


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    """Raise :class:`~edgetl.errors.UnknownNameError` (naming the choices) unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UnknownNameError(kind, value, choices, "choose one of " + ", ".join(choices))
