"""``edgetl.zoo.build``: a catalog model as a torch module, with the requested weights, input size and head.

It is the one entry for building a model: the builder arguments come from :func:`edgetl.zoo.catalog.arch_kwargs`
(both zoos), the weights from :func:`edgetl.zoo.weights.load_model` (ImageNet from the offline folders or a
download, a state_dict file, or none), and the head from :func:`edgetl.zoo.catalog.replace_head`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from edgetl.errors import ConfigError
from edgetl.zoo.catalog import replace_head
from edgetl.zoo.weights import load_model

if TYPE_CHECKING:
    import torch


def build(
    name: str,
    weights: str | os.PathLike[str] | None = "imagenet",
    resolution: int | None = None,
    num_classes: int | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
) -> torch.nn.Module:
    """Build a catalog model with the requested weights and head size, in eval mode.

    The network is the trainable (unfused) one; :func:`edgetl.zoo.catalog.deployed_model` gives the form that is
    exported and timed.

    Args:
        name: a catalog name or id (``resnet18``, ``vit_b_16.IMAGENET1K_V1``, ``timm/tf_efficientnet_lite0``).
        weights: ``imagenet`` (the entry's pretrained weights), ``none`` (or None: random initialisation), or a
            PATH to a state_dict file (``.pth``/``.pt``/``.safetensors``); a file's head is loaded only when it has
            the catalog's 1000 classes.
        resolution: the input size, default the card's; it sizes the architectures whose shape depends on it
            (ViT, MaxViT, EfficientFormer-v2), and ViT's pretrained position embeddings are interpolated to it.
        num_classes: the size of the classifier. None keeps the catalog's 1000-class head (trained with ImageNet
            weights); any other number replaces it with a fresh, randomly initialised one.
        weights_dir: an offline weights folder (default ``$EDGETL_WEIGHTS_DIR``), see :mod:`edgetl.zoo.weights`.

    Returns:
        The ``torch.nn.Module``, in eval mode, on the CPU.

    Raises:
        UnknownNameError: the name is not in the catalog.
        WeightsError: the weights are not on this machine, are corrupt, or do not match the architecture.
        ConfigError: ``num_classes`` or ``resolution`` is not a positive integer.
    """
    for label, value in (("num_classes", num_classes), ("resolution", resolution)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{label} must be a positive integer, not {value!r}")
    loaded = load_model(name, weights, weights_dir=weights_dir, resolution=resolution)
    model = loaded.model
    if num_classes is not None and num_classes != loaded.card.num_classes:
        replace_head(model, loaded.card, num_classes)
    return model.eval()
