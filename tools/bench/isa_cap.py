"""``--max-isa``: run a benchmark as it would run on a CPU with a smaller instruction set (e.g. AVX2, no bf16).

oneDNN (PyTorch's convolutions and bf16 matmuls) dispatches to the ISA that ``ONEDNN_MAX_CPU_ISA``
caps it to; ATen's own vectorised kernels (``ATEN_CPU_CAPABILITY``) and MKL's GEMMs
(``MKL_ENABLE_INSTRUCTIONS``) are capped to the matching level. This shows what these libraries would
do on, say, an AVX2 CPU without bf16: its ISA, not that CPU's clocks or caches. edgetl reads the same
variable: under a cap below oneDNN's bf16 ISAs, ``--precision-train auto`` trains in fp32.

All three are read when the libraries load, so :func:`restart_with_isa_cap` re-executes the script with
them set.
"""

from __future__ import annotations

import os
import sys

# oneDNN ISA name -> (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS); names not listed cap oneDNN only
_MATCHING = {
    "SSE41": ("default", "SSE4_2"),
    "AVX": ("default", "AVX"),
    "AVX2": ("avx2", "AVX2"),
    "AVX2_VNNI": ("avx2", "AVX2"),
    "AVX2_VNNI_2": ("avx2", "AVX2"),
    "AVX512_CORE": ("avx512", "AVX512"),
    "AVX512_CORE_VNNI": ("avx512", "AVX512"),
}


def isa_environment(max_isa: str) -> dict[str, str]:
    """The environment variables that cap oneDNN (and ATen and MKL, where they have a matching level) to ``max_isa``."""
    name = max_isa.strip().upper()
    env = {"ONEDNN_MAX_CPU_ISA": name}
    if name in _MATCHING:
        env["ATEN_CPU_CAPABILITY"], env["MKL_ENABLE_INSTRUCTIONS"] = _MATCHING[name]
    return env


def restart_with_isa_cap(max_isa: str | None) -> None:
    """Re-execute this Python process with :func:`isa_environment` set, unless it already is (or no cap)."""
    if not max_isa:
        return
    env = isa_environment(max_isa)
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def describe_isa() -> str:
    """What this process runs with: the caps that are set, or ``no ISA cap``."""
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(k)]
    return ", ".join(caps) if caps else "no ISA cap"
