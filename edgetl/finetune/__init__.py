"""Fine-tuning: strategies, the feature cache, the training loop, checkpoints and the Python API.

The public entry points are :func:`finetune` and :func:`load_trained_model`; they are imported
lazily so that ``import edgetl`` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunResult", "StrategyDecision", "TrainedModel", "finetune", "load_trained_model"]


def __getattr__(name: str) -> Any:
    if name in ("finetune", "load_trained_model", "RunResult"):
        from edgetl.finetune import api

        return getattr(api, name)
    if name == "TrainedModel":
        from edgetl.finetune.model import TrainedModel

        return TrainedModel
    if name == "StrategyDecision":
        from edgetl.finetune.strategy import StrategyDecision

        return StrategyDecision
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
