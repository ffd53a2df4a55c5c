"""The built-in profile nearest to a machine's fingerprint (``edgetl device info --on ssh://HOST``).

The board's own name wins (the device tree says ``Raspberry Pi 5 Model B``, ``NVIDIA Jetson Orin Nano``); else the
profiles of the same architecture are ranked by how alike their ISA flags are, then by core count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from edgetl.device.profiles import list_profiles

_ARM = ("aarch64", "arm64", "armv7l", "armv8l")
_ISA_ALIASES = {"asimd": "neon", "asimddp": "dotprod", "avx512vnni": "avx512_vnni"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _name_match(board: str, name: str) -> int:
    """How many words of the profile's name appear in order in the board's name (0: not all of them)."""
    words, said = _words(name), " ".join(_words(board))
    return len(words) if words and re.search(r"\b" + r"\s".join(words) + r"\b", said) else 0


def _isa(flags: Any) -> set[str]:
    return {_ISA_ALIASES.get(f.lower(), f.lower()) for f in flags or ()}


def nearest_profile(info: Mapping[str, Any]) -> tuple[str | None, str]:
    """The built-in profile most like the machine ``info`` describes, and why.

    Args:
        info: the board's fingerprint as :func:`edgetl.device.machine.machine_info` reports it (``arch``,
            ``board``, ``cpu.isa``, ``cpu.cores``).

    Returns:
        ``(profile name, reason)``, or ``(None, reason)`` when no profile has the board's architecture.
    """
    profiles = [p for p in list_profiles() if p.family != "custom"]
    board = str(info.get("board") or "")
    named = max(((_name_match(board, p.name), p.name) for p in profiles), default=(0, ""))
    if named[0]:
        return named[1], f"the board calls itself {board!r}"
    arm = str(info.get("arch", "")).lower() in _ARM
    same_arch = [p for p in profiles if (p.family in ("raspberry-pi", "jetson")) == arm]
    if not same_arch:
        return None, f"no built-in profile for {info.get('arch')}"
    cpu = info.get("cpu") or {}
    isa, cores = _isa(cpu.get("isa")), int(cpu.get("cores") or 1)

    def score(p: Any) -> tuple[float, float]:
        theirs = _isa(p.cpu.isa if p.cpu else ())
        alike = len(isa & theirs) / max(len(isa | theirs), 1)
        return alike, -abs((p.cpu.cores if p.cpu else cores) - cores)

    best = max(same_arch, key=score)
    return best.name, f"closest ISA flags and core count among the {info.get('arch')} profiles"
