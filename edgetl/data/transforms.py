"""Image transforms for training and evaluation, built from a model card's preprocessing.

This module imports torchvision: :mod:`edgetl.data` loads it on first use of :func:`build_transform`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from edgetl.data.options import AUGMENTATIONS, check_choice

if TYPE_CHECKING:
    import torch

    from edgetl.catalog import Preprocess


def build_transform(
    preprocess: Preprocess | Any,
    resolution: int | None = None,
    train: bool = False,
    augment: str = "light",
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the image transform for a model from its ModelCard's :class:`~edgetl.catalog.Preprocess`.

    The evaluation transform is resize (shorter side to ``resize_size``), center-crop to
    ``crop_size``, to tensor and normalize, as torchvision's weights transforms do. The training
    transform replaces resize and crop by augmentation:

    * ``"none"``: exactly the evaluation transform (what a feature cache needs);
    * ``"light"``: random resized crop (scale 0.5-1), horizontal flip, rotation up to 10 degrees;
    * ``"strong"``: random resized crop (scale 0.2-1), horizontal flip, rotation up to 20 degrees,
      colour jitter and random erasing.

    Args:
        preprocess: a ``Preprocess`` (or a ``ModelCard``, whose ``preprocess`` is used).
        resolution: crop size to use instead of the card's (resize is scaled with it).
        train: build the training transform.
        augment: ``"none"``, ``"light"`` or ``"strong"`` (training only).
    """
    check_choice("augment", augment, AUGMENTATIONS)
    pre = getattr(preprocess, "preprocess", preprocess).at_resolution(resolution)
    interp = _interpolation(pre.interpolation)
    normalize = T.Normalize(mean=list(pre.mean), std=list(pre.std))
    if not train or augment == "none":
        return _eval_transform(pre, interp, normalize)
    return _train_transform(pre, interp, normalize, strong=augment == "strong")


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BILINEAR


def _eval_transform(pre: Preprocess, interp: InterpolationMode, normalize: T.Normalize) -> T.Compose:
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=interp, antialias=True),
            T.CenterCrop(pre.crop_size),
            T.ToTensor(),
            normalize,
        ]
    )


def _train_transform(pre: Preprocess, interp: InterpolationMode, normalize: T.Normalize, strong: bool) -> T.Compose:
    fill = tuple(round(255 * m) for m in pre.mean)  # rotated-in corners become 0 after normalization
    if not strong:
        ops = [
            T.RandomResizedCrop(pre.crop_size, scale=(0.5, 1.0), interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10, interpolation=InterpolationMode.BILINEAR, fill=fill),
            T.ToTensor(),
            normalize,
        ]
    else:
        ops = [
            T.RandomResizedCrop(pre.crop_size, scale=(0.2, 1.0), interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(20, interpolation=InterpolationMode.BILINEAR, fill=fill),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
            T.ToTensor(),
            normalize,
            T.RandomErasing(p=0.25, value=0),
        ]
    return T.Compose(ops)
