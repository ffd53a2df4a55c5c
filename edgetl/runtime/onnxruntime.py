"""ONNX Runtime runner: the CPU execution provider everywhere, CUDA and TensorRT where installed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import BackendUnavailableError, ConfigError, EdgetlError, ExportError
from edgetl.runtime.base import Runner, TensorSpec

log = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"

#: Short provider names and the execution providers they ask for, in priority order.
PROVIDER_ALIASES: dict[str, tuple[str, ...]] = {
    "cpu": (CPU_EP,),
    "cuda": (CUDA_EP, CPU_EP),
    "tensorrt": (TENSORRT_EP, CUDA_EP, CPU_EP),
}

_INSTALL_HINT = {
    CUDA_EP: "install onnxruntime-gpu (pip install onnxruntime-gpu) on a machine with CUDA and cuDNN",
    TENSORRT_EP: "install onnxruntime-gpu and the TensorRT libraries (pip install onnxruntime-gpu tensorrt) "
    "on a machine with CUDA",
}

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime build offers (e.g. ``["CPUExecutionProvider"]``)."""
    import onnxruntime as ort  # deferred: heavy

    return list(ort.get_available_providers())


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """Turn ``None``, ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or a list of EP names into a provider list.

    ``None`` picks CUDA when this ONNX Runtime has it and the CPU otherwise (never TensorRT by
    itself: its engine build takes minutes).

    Raises:
        BackendUnavailableError: a provider that this ONNX Runtime build does not offer; the message
            says what to install.
        ConfigError: an unknown provider name.
    """
    available = available_providers()
    if providers is None:
        return [CUDA_EP, CPU_EP] if CUDA_EP in available else [CPU_EP]
    if isinstance(providers, str):
        key = providers.lower()
        if key in PROVIDER_ALIASES:
            requested = list(PROVIDER_ALIASES[key])
        elif providers.endswith("ExecutionProvider"):
            requested = [providers]
        else:
            raise ConfigError(
                f"unknown ONNX Runtime provider '{providers}'; use one of {', '.join(PROVIDER_ALIASES)} "
                "or a full execution provider name such as CPUExecutionProvider"
            )
    else:
        requested = list(providers)
    wanted = requested[0]
    if wanted not in available:
        hint = _INSTALL_HINT.get(wanted, "install an onnxruntime build that includes it")
        raise BackendUnavailableError(
            f"ONNX Runtime provider {wanted} is not available here (available: {', '.join(available)}); {hint}"
        )
    return [p for p in requested if p in available]


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with ONNX Runtime.

    Args:
        path_or_bytes: the ``.onnx`` file or its serialized bytes.
        providers: ``None`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"tensorrt"``, or a
            list of execution provider names. Asking for one that is not installed raises
            :class:`~edgetl.errors.BackendUnavailableError`.
        threads: ``intra_op_num_threads`` (None lets ONNX Runtime use every core).
        graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
        provider_options: per-provider option dicts, in the order of the resolved providers.
        name: a label for reports (default ``onnxruntime``).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path_or_bytes: str | os.PathLike[str] | bytes,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        graph_optimization_level: str = "all",
        provider_options: Sequence[dict[str, Any]] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if isinstance(path_or_bytes, (bytes, bytearray)):
            self._model: str | bytes = bytes(path_or_bytes)
        else:
            path = Path(path_or_bytes)
            if not path.is_file():
                raise ConfigError(f"ONNX model {path} does not exist")
            self._model = str(path)
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be a positive number, got {threads}")
        if graph_optimization_level not in _OPT_LEVELS:
            raise ConfigError(
                f"unknown graph optimization level '{graph_optimization_level}'; "
                f"use one of {', '.join(_OPT_LEVELS)}"
            )
        self.providers = resolve_providers(providers)
        self.threads = threads
        self.graph_optimization_level = graph_optimization_level
        self.provider_options = list(provider_options) if provider_options else None
        self.session: Any = None
        self._inputs: list[TensorSpec] = []
        self._output_names: list[str] = []

    def activate_impl(self) -> None:
        import onnxruntime as ort  # deferred: heavy

        options = session_options(self.threads, self.graph_optimization_level)
        try:
            self.session = ort.InferenceSession(
                self._model, sess_options=options, providers=self.providers,
                provider_options=self.provider_options,
            )
        except Exception as exc:  # ORT raises its own pybind exception types for a bad model
            where = self._model if isinstance(self._model, str) else "the given bytes"
            raise ExportError(f"ONNX Runtime cannot load {where}: {_one_line(exc)}") from exc
        used = self.session.get_providers()
        if used[0] != self.providers[0]:
            log.warning("ONNX Runtime fell back from %s to %s", self.providers[0], used[0])
        self._inputs = [
            TensorSpec(i.name, tuple(_dim(d) for d in i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32)))
            for i in self.session.get_inputs()
        ]
        self._output_names = [o.name for o in self.session.get_outputs()]
        log.debug("onnxruntime session on %s, inputs %s", used, self._inputs)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(self._output_names, feed)
        except Exception as exc:  # ORT's InvalidArgument / RuntimeException
            raise EdgetlError(f"ONNX Runtime inference failed: {_one_line(exc)}") from exc
        return dict(zip(self._output_names, outputs))  # noqa: B905 (the board runs Python 3.8: no strict=)

    def deactivate_impl(self) -> None:
        self.session = None

    def input_specs_impl(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def active_providers(self) -> list[str]:
        """The providers the live session uses (after any fallback)."""
        self._require_active("active_providers")
        return list(self.session.get_providers())


def session_options(threads: int | None = None, graph_optimization_level: str = "all") -> Any:
    """The ``onnxruntime.SessionOptions`` every edgetl session uses: ``threads`` intra-op threads (None: every
    core), one inter-op thread, sequential execution, quiet logs."""
    import onnxruntime as ort  # deferred: heavy

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization_level])
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def _dim(d: Any) -> int | str | None:
    if isinstance(d, int) and d > 0:
        return d
    return d if isinstance(d, str) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] if text else type(exc).__name__
