"""The export stage's ONNX step: the model's ONNX file (see :mod:`edgetl.zoo.onnx_io`) and its parity with PyTorch.

The export itself lives in the core module :mod:`edgetl.zoo.onnx_io`, which benchmarks and device
calibration also use; this module adds what only the export stage needs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.errors import ConfigError, ExportError
from edgetl.runtime.base import OUTPUT_NAME
from edgetl.runtime.onnxruntime import OnnxRuntimeRunner
from edgetl.zoo.onnx_io import eval_mode, module_device

if TYPE_CHECKING:
    import torch

__all__ = ["ParityReport", "check_parity"]


@dataclass(frozen=True)
class ParityReport:
    """How closely an ONNX model reproduces its PyTorch model on the same inputs.

    Attributes:
        samples: number of inputs compared.
        max_abs_diff, mean_abs_diff: over all logits.
        top1_agreement: fraction of inputs whose arg-max class is the same (0-1).
        atol: the tolerance ``passed`` was judged with.
        passed: ``max_abs_diff <= atol``.
    """

    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def check_parity(
    model: torch.nn.Module,
    onnx_path: str | os.PathLike[str],
    inputs: torch.Tensor,
    atol: float = 1e-4,
) -> ParityReport:
    """Compare an ONNX model (run by ONNX Runtime on the CPU) with its PyTorch model.

    Args:
        model: the PyTorch model (run in eval mode on its device; its mode is restored).
        onnx_path: the exported file.
        inputs: an NCHW float batch; a model exported with a fixed batch is fed in chunks of it.
        atol: the largest absolute logit difference that passes.

    Returns:
        A :class:`ParityReport`.
    """
    import torch  # deferred: heavy

    if inputs.ndim != 4 or inputs.shape[0] < 1:
        raise ConfigError(f"inputs must be a non-empty NCHW batch, got shape {list(inputs.shape)}")
    device = module_device(model)
    with eval_mode(model), torch.no_grad():
        expected = model(inputs.to(device)).detach().float().cpu().numpy()
    x = inputs.detach().float().cpu().numpy()
    with OnnxRuntimeRunner(onnx_path, providers="cpu") as runner:
        fixed = runner.input_specs()[0].shape[0]
        step = fixed if isinstance(fixed, int) else len(x)
        if len(x) % step:
            raise ConfigError(f"{onnx_path} has a fixed batch of {step}; pass a multiple of {step} inputs")
        got = np.concatenate([runner.infer(x[i : i + step])[OUTPUT_NAME] for i in range(0, len(x), step)])
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {list(got.shape)} differs from PyTorch's {list(expected.shape)}")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    agree = float(np.mean(got.reshape(len(got), -1).argmax(1) == expected.reshape(len(expected), -1).argmax(1)))
    max_diff = float(diff.max())
    return ParityReport(
        samples=len(x),
        max_abs_diff=max_diff,
        mean_abs_diff=float(diff.mean()),
        top1_agreement=agree,
        atol=atol,
        passed=max_diff <= atol,
    )
