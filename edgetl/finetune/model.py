"""The fine-tuned model as the export stage sees it: :class:`TrainedModel` and :func:`load_trained_model`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetl.errors import CheckpointError
from edgetl.finetune import checkpoint as ckpt
from edgetl.finetune.rundir import RunDir
from edgetl.zoo.catalog import ModelCard, Preprocess, get_card, replace_head

log = logging.getLogger(__name__)


class TrainedModel(nn.Module):
    """A fine-tuned classifier in eval mode, with everything needed to export and run it.

    Calling it runs the network: ``logits = trained(images)`` with ``images`` an ``N x 3 x R x R``
    float tensor prepared as :attr:`preprocess` says (resize, center-crop, scale to [0, 1],
    normalize with mean/std, RGB, NCHW).

    Attributes:
        network: the torchvision network with its new head (the module to export).
        card: the catalog entry of the architecture and its pretrained weights.
        classes: class names, in output order.
        preprocess: how to prepare an input image, at the training resolution.
        resolution: the input height and width.
        metrics: the run's final metrics (``metrics.json``'s summary).
        checkpoint: the checkpoint's JSON state (``checkpoint.json``).
        run_dir: the run folder it was loaded from.
    """

    def __init__(
        self,
        network: nn.Module,
        card: ModelCard,
        classes: list[str],
        preprocess: Preprocess,
        metrics: dict[str, Any],
        checkpoint: dict[str, Any],
        run_dir: Path,
    ) -> None:
        super().__init__()
        self.network = network
        self.card = card
        self.classes = list(classes)
        self.preprocess = preprocess
        self.metrics = metrics
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        self.eval()

    @property
    def resolution(self) -> int:
        return self.preprocess.crop_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input of the right shape (``batch x 3 x R x R``), e.g. for ONNX export."""
        param = next(self.network.parameters())
        return torch.zeros(batch, 3, self.resolution, self.resolution, dtype=param.dtype, device=param.device)

    def predict(self, images: torch.Tensor) -> list[str]:
        """Class names of a batch of prepared images."""
        with torch.inference_mode():
            return [self.classes[i] for i in self(images).argmax(1).tolist()]


def load_trained_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> TrainedModel:
    """Load the best fine-tuned weights of a run folder.

    Reads ``checkpoint.json`` and ``model.safetensors`` (never unpickling anything), rebuilds the
    architecture with the builder arguments recorded at training time, loads the weights strictly
    and returns the model in eval mode.

    Args:
        run_dir: the ``--out`` folder of ``edgetl finetune``.
        device: where to put the model.

    Raises:
        CheckpointError: the folder is not a finished edgetl run, or its files do not match.
    """
    from edgetl.zoo.weights import build_network

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the --out folder of `edgetl finetune`")
    meta, state = ckpt.load_best(run_dir)
    try:
        card = get_card(meta["model"])
        classes = list(meta["classes"])
        preprocess = Preprocess.from_dict(meta["preprocess"])
        arch_kwargs = dict(meta.get("arch_kwargs") or {})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{RunDir(run_dir).checkpoint} lacks field {exc}; it is incomplete") from exc
    if "input_size" in arch_kwargs:  # JSON turned MaxViT's tuple into a list
        arch_kwargs["input_size"] = tuple(arch_kwargs["input_size"])
    network = build_network(card, arch_kwargs)
    replace_head(network, card, len(classes))
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{RunDir(run_dir).weights} does not match {card.name} with {len(classes)} classes "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    network.eval()
    model = TrainedModel(network, card, classes, preprocess, dict(meta.get("final_metrics") or {}), meta, run_dir)
    return model.to(device).eval()
