"""This machine: host name, CPU (model, cores, clock, ISA flags), RAM, and a fingerprint of them.

Read from the operating system (``/proc/cpuinfo``, ``/proc/meminfo``, cpufreq) with the standard
library only, so device profiles can tell whether they describe this machine without loading a runtime.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: The ISA extensions edgetl records (``/proc/cpuinfo`` spelling); the rest of the flags do not matter to it.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
             "neon", "asimd", "asimddp", "f16c")

_CPUINFO = Path("/proc/cpuinfo")
_MEMINFO = Path("/proc/meminfo")
_MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")


@dataclass
class CpuInfo:
    """What the operating system says about the CPU."""

    model: str
    cores: int
    ghz: float
    isa: list[str]
    ram_mb: float

    @property
    def simd_lanes_fp32(self) -> int:
        """fp32 lanes of the widest SIMD unit (AVX-512: 16, AVX/AVX2: 8, SSE/NEON: 4)."""
        if "avx512f" in self.isa:
            return 16
        if "avx2" in self.isa or "avx" in self.isa:
            return 8
        return 4  # SSE or NEON: 128-bit vectors

    @property
    def has_vnni(self) -> bool:
        """Whether the CPU has the VNNI int8 dot-product instructions."""
        return any(f in self.isa for f in ("avx512_vnni", "avx_vnni", "avx512vnni"))


def host_name() -> str:
    """This machine's network name (``this machine`` when the platform gives none)."""
    return platform.node() or "this machine"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def read_cpu() -> CpuInfo:
    """Read the CPU model, core count, clock, ISA flags and RAM of this machine."""
    text = ""
    with contextlib.suppress(OSError):
        text = _CPUINFO.read_text()
    flags: set[str] = set()
    mhz: list[float] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "cpu MHz":
            mhz.append(float(value))
    ghz = max(mhz) / 1000 if mhz else 2.0
    if _MAX_FREQ.exists():
        ghz = int(_MAX_FREQ.read_text()) / 1e6
    isa = [f for f in ISA_FLAGS if f in flags]
    return CpuInfo(cpu_model(), available_cores(), round(ghz, 3), isa, round(_ram_mb()))


_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_mb(caches: Path = _CACHES) -> float:
    """The size of the CPU's last-level cache in MB (1e6 bytes), from sysfs; 0 where the system does not say."""
    best_level, size = 0, 0.0
    for index in sorted(caches.glob("index*")) if caches.is_dir() else []:
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m and level >= best_level:
            best_level = level
            size = int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)] / 1e6
    return size


def _ram_mb() -> float:
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", _MEMINFO.read_text())
    except OSError:
        return 0.0
    return int(m.group(1)) / 1024 if m else 0.0


_RUNTIME_DISTS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                  "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11")}


def fingerprint(cpu: CpuInfo | None = None, runtime: str = "onnxruntime") -> dict[str, Any]:
    """What makes timings on this machine comparable: CPU model, ISA flags, cores and the version of the
    runtime that timed them (``onnxruntime`` or ``tensorrt``).

    Unlike the host name, it stays the same on a renamed machine and changes with the runtime.
    """
    cpu = cpu or read_cpu()
    return {"cpu": cpu.model, "isa": list(cpu.isa), "cores": cpu.cores, runtime: runtime_version(runtime)}


def runtime_version(runtime: str) -> str | None:
    """The installed runtime's version, read from its package metadata (without importing it)."""
    for dist in _RUNTIME_DISTS.get(runtime, (runtime,)):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return None


#: The packages whose versions an artifact's manifest and a build's stage keys record.
VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "torchvision", "onnx", "onnxruntime", "onnxslim")


def package_versions() -> dict[str, str | None]:
    """edgetl's, Python's and :data:`VERSIONED_PACKAGES`' versions (None: not installed), read from package
    metadata without importing them."""
    from edgetl import __version__  # the package's own version, defined once in its __init__

    return {"edgetl": __version__, "python": platform.python_version(), **installed_versions(VERSIONED_PACKAGES)}


#: The packages a board's fingerprint lists (those installed).
BOARD_PACKAGES: tuple[str, ...] = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python")


def installed_versions(dists: tuple[str, ...]) -> dict[str, str | None]:
    """Each package's version from its metadata, without importing it (None: not installed)."""
    found: dict[str, str | None] = {}
    for dist in dists:
        found[dist] = None
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _os_name() -> str:
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _gpu() -> dict[str, Any] | None:
    """A Jetson (device tree, L4T release) or an NVIDIA GPU (``nvidia-smi``), else None."""
    import shutil
    import subprocess

    tegra = _read("/etc/nv_tegra_release")
    if tegra:
        return {"kind": "jetson", "l4t": tegra.splitlines()[0]}
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              check=False, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return {"kind": "nvidia", "gpus": [line.strip() for line in done.stdout.splitlines() if line.strip()]}
    return None


def machine_info() -> dict[str, Any]:
    """This machine as ``device info`` prints it (here, or on a board by its runner): CPU model and ISA flags, cores,
    RAM, OS, Python, runtime versions, GPU, and its :func:`fingerprint`."""
    cpu = read_cpu()
    info = {"host": platform.node(), "arch": platform.machine(), "board": _read("/proc/device-tree/model"),
            "os": _os_name(), "kernel": platform.release(),
            "python": platform.python_version(), "python_path": sys.executable,
            "cpu": {"model": cpu.model, "cores": cpu.cores, "ghz": cpu.ghz, "isa": list(cpu.isa),
                    "ram_mb": cpu.ram_mb, "llc_mb": round(last_level_cache_mb(), 3)},
            "packages": {k: v for k, v in installed_versions(BOARD_PACKAGES).items() if v is not None},
            "gpu": _gpu()}
    try:
        import onnxruntime

        info["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        info["onnxruntime_providers"] = None
    info["fingerprint"] = fingerprint(cpu)
    return info
