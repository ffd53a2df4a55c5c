"""The real command line in a fresh interpreter, for the tests that must see exit codes and stderr as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_env() -> dict[str, str]:
    """This checkout importable, one OpenMP thread, and no EDGETL_DEBUG (errors print as users see them)."""
    env = {k: v for k, v in os.environ.items() if k != "EDGETL_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1]), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def edgetl_cli(*args: object, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m edgetl ARGS`` and return the finished process (text output captured)."""
    return subprocess.run([sys.executable, "-m", "edgetl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(), timeout=timeout)
