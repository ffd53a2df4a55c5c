"""The arithmetic training runs in (``--precision-train``): fp32, or mixed precision where the hardware has it.

``auto`` picks, per device:

- **CUDA**: bf16 autocast where the GPU computes bf16 natively
  (``torch.cuda.is_bf16_supported(including_emulation=False)``: Ampere and later), otherwise fp16
  autocast with a GradScaler; channels-last either way.
- **CPU**: bf16 autocast on CPUs with native bf16 units, fp32 elsewhere; channels-last either way.
  Native means the CPU advertises AMX-BF16 or AVX-512 BF16 (x86 flags ``amx_bf16`` / ``avx512_bf16``)
  or the Arm BF16 extension (``bf16`` in the ``Features`` line), as read from ``/proc/cpuinfo``, and
  oneDNN is not capped below its bf16 ISAs (``ONEDNN_MAX_CPU_ISA``, e.g. ``AVX2``: then oneDNN does
  not use those units). Without them oneDNN emulates bf16 and it runs slower than fp32.

Channels-last on the CPU in fp32 too: oneDNN computes convolutions in NHWC, and NCHW tensors are
reordered at every convolution. Measured on a 2-core EPYC (an fp32 training step, 160 px, batch 32),
channels-last was 1.2x faster for ResNet-18 and 1.3-1.7x for MobileNetV3-Large and EfficientNet-B0;
with oneDNN capped to AVX2, 1.1x and 1.4-1.8x. It is a memory layout only: the weights saved and
exported are the same tensors.

Weights, optimizer state and gradients stay in float32 (autocast only lowers the matmuls and convolutions).
Under bf16 on the CPU, the trainable grouped convolutions that train faster in fp32 there stay in fp32
(:mod:`edgetl.finetune.conv_dtype` times them before training).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from edgetl.errors import ConfigError

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ONEDNN_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
"""The environment variables that cap the ISA oneDNN dispatches to (the first one set wins, as in oneDNN)."""
NO_BF16_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
"""oneDNN's x86 ISA names below its first bf16 one (``AVX512_CORE_BF16``); ``DEFAULT`` / ``ALL`` cap nothing."""


@dataclass(frozen=True)
class TrainPrecision:
    """What a run computes in, and why.

    Attributes:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        dtype: what is used: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        channels_last: whether images and weights use the channels-last memory format.
        grad_scaler: whether gradients are scaled (fp16 only).
        device: ``cpu`` or ``cuda``.
        reason: one sentence.
        fp32_convs: the modules (by name) of the convolutions that train in fp32 under autocast
            (:mod:`edgetl.finetune.conv_dtype`).
        conv_timings: the timings that chose them, one row per distinct convolution.
    """

    requested: str
    dtype: str
    channels_last: bool
    grad_scaler: bool
    device: str
    reason: str
    fp32_convs: tuple[str, ...] = ()
    conv_timings: tuple[dict[str, Any], ...] = ()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return _DTYPES.get(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """As ``metrics.json`` holds it."""
        return {**asdict(self), "fp32_convs": list(self.fp32_convs), "conv_timings": list(self.conv_timings)}


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped to by ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``), upper case; None if unset."""
    for name in ONEDNN_ISA_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper()
    return None


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively (AMX-BF16, AVX-512 BF16 or Arm BF16), as oneDNN uses it.

    False when ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below its bf16 ISAs (e.g. ``AVX2``): oneDNN then
    emulates bf16 whatever the CPU has. Cached: the environment is read once, as oneDNN reads it once.
    """
    if onednn_isa_cap() in NO_BF16_ISAS:
        return False
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def cuda_has_native_bf16() -> bool:
    """Whether the current CUDA GPU computes bf16 natively (not emulated)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation, and reports native support only
        return torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device | str) -> TrainPrecision:
    """Decide the training arithmetic for ``requested`` on ``device`` (see the module docstring).

    Raises:
        ConfigError: fp16 on the CPU (it has no fp16 training path worth using), or an unknown value.
    """
    kind = torch.device(device).type
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"unknown --precision-train '{requested}'; choose auto, fp32, bf16 or fp16")
    if kind == "cuda":
        return _resolve_cuda(requested)
    if requested == "fp16":
        raise ConfigError("--precision-train fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    native = cpu_has_native_bf16()
    cap = onednn_isa_cap()
    no_bf16 = (f"oneDNN is capped to {cap} (ONEDNN_MAX_CPU_ISA)" if cap in NO_BF16_ISAS
               else "the CPU has no native bf16 units")
    if requested == "auto":
        if native:
            return TrainPrecision("auto", "bf16", True, False, kind,
                                  "the CPU has native bf16 (AMX or AVX-512 BF16); channels-last for oneDNN")
        return TrainPrecision("auto", "fp32", True, False, kind, f"{no_bf16}; fp32, channels-last for oneDNN")
    if requested == "bf16":
        if not native:
            log.warning("--precision-train bf16: %s, so bf16 is emulated and slow", no_bf16)
        return TrainPrecision("bf16", "bf16", True, False, kind, "requested")
    return TrainPrecision("fp32", "fp32", True, False, kind, "requested; channels-last for oneDNN")


def _resolve_cuda(requested: str) -> TrainPrecision:
    native = cuda_has_native_bf16()
    if requested == "auto":
        if native:
            return TrainPrecision("auto", "bf16", True, False, "cuda", "the GPU has native bf16")
        return TrainPrecision("auto", "fp16", True, True, "cuda", "the GPU has no native bf16: fp16 with a GradScaler")
    if requested == "bf16" and not native:
        log.warning("--precision-train bf16: this GPU emulates bf16; fp16 would be faster")
    return TrainPrecision(requested, requested, True, requested == "fp16", "cuda", "requested")
