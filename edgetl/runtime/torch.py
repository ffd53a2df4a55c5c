"""Eager PyTorch runner: the reference every exported model is compared with."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.errors import BackendUnavailableError, ConfigError
from edgetl.runtime.base import INPUT_NAME, OUTPUT_NAME, Runner, TensorSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device that is not there is an error.

    Raises:
        BackendUnavailableError: CUDA was asked for and this torch has no usable GPU.
        ConfigError: a device string torch does not understand.
    """
    import torch  # deferred: heavy

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown torch device '{device}'; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "CUDA is not available to torch here; use --device cpu, or install a CUDA build of torch "
                "on a machine with an NVIDIA GPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{dev} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


class TorchRunner(Runner):
    """Runs a ``torch.nn.Module`` eagerly under ``torch.inference_mode``.

    The module is put in eval mode and moved to the device when the runner is activated (in place:
    pass a copy if the caller still needs it where it was); its train/eval mode is restored on
    deactivation. On CUDA, each inference synchronises before returning, so its time is real.

    Args:
        module: the model; it takes one NCHW float32 tensor.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: torch's intra-op thread count while the runner is active (None leaves it alone).
        name: a label for reports (default ``torch``).
    """

    backend = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        device: str | torch.device = "auto",
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        import torch  # deferred: heavy

        super().__init__(name)
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(
                f"TorchRunner needs a torch.nn.Module, got {type(module).__name__}; "
                "run an ONNX file with the onnxruntime or tensorrt runtime"
            )
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be a positive number, got {threads}")
        self.module = module
        self.device = resolve_device(device)
        self.threads = threads
        self._was_training = False
        self._saved_threads: int | None = None

    def activate_impl(self) -> None:
        import torch  # deferred: heavy

        if any(p.is_meta for p in self.module.parameters()):
            raise ConfigError("the module's parameters are on the meta device; build it with real weights")
        self._was_training = self.module.training
        self.module.eval().to(self.device)
        if self.threads is not None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch  # deferred: heavy

        (array,) = feed.values()
        with torch.inference_mode():
            x = torch.from_numpy(array).to(self.device, non_blocking=True)
            out = self.module(x)
            outputs = _named_outputs(out)
            result = {k: v.detach().float().cpu().numpy() for k, v in outputs.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result

    def deactivate_impl(self) -> None:
        import torch  # deferred: heavy

        self.module.train(self._was_training)
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def input_specs_impl(self) -> list[TensorSpec]:
        return [TensorSpec(INPUT_NAME, ("batch", None, None, None), np.dtype(np.float32))]


def _named_outputs(out: Any) -> dict[str, Any]:
    import torch  # deferred: heavy

    if isinstance(out, torch.Tensor):
        return {OUTPUT_NAME: out}
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        return {(OUTPUT_NAME if i == 0 else f"output_{i}"): v for i, v in enumerate(tensors)}
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return {OUTPUT_NAME: logits}
    raise ConfigError(f"the module returned {type(out).__name__}; a runner needs a tensor, tuple or dict")
