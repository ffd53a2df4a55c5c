"""Image transforms for training and evaluation, built from a model card's preprocessing.

This module imports torchvision: :mod:`edgetl.data` loads it on first use of :func:`build_transform`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from edgetl.data.options import AUGMENTATIONS, check_choice

if TYPE_CHECKING:
    from edgetl.zoo.catalog import Preprocess

MIN_CROP_SCALE = {"light": 0.5, "strong": 0.2}
"""The smallest area fraction RandomResizedCrop takes under each augmentation."""


def build_transform(
    preprocess: Preprocess | Any,
    resolution: int | None = None,
    train: bool = False,
    augment: str = "light",
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the image transform for a model from its ModelCard's :class:`~edgetl.zoo.catalog.Preprocess`.

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


# --- the tensor pipeline: decode and resize once (cacheable), then augment uint8 tensors ----------


class PrepareImage:
    """A decoded RGB image -> a uint8 ``3 x H x W`` tensor whose shorter side is ``short_side``.

    With ``shrink_only`` a smaller image is kept as it is (training crops resize it anyway); without it
    this is exactly the evaluation transform's ``Resize`` on the PIL image.
    """

    def __init__(self, short_side: int, interpolation: InterpolationMode, shrink_only: bool) -> None:
        self.short_side, self.interpolation, self.shrink_only = short_side, interpolation, shrink_only

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not (self.shrink_only and min(image.size) <= self.short_side):
            image = TF.resize(image, self.short_side, interpolation=self.interpolation, antialias=True)
        return TF.pil_to_tensor(image)

    def stored_shape(self, width: int, height: int) -> tuple[int, int]:
        """The (height, width) an image of this size is kept at."""
        short = min(width, height)
        if self.shrink_only and short <= self.short_side:
            return height, width
        return (self.short_side, int(self.short_side * width / height)) if height <= width else (
            int(self.short_side * height / width), self.short_side)


class _ToFloat:
    """uint8 -> float32 in [0, 1], computed as ``ToTensor`` does (``x / 255``), so both pipelines agree bitwise."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).div(255)


def build_tensor_pipeline(
    preprocess: Preprocess | Any,
    resolution: int | None = None,
    train: bool = False,
    augment: str = "light",
) -> tuple[PrepareImage, Callable[[torch.Tensor], torch.Tensor]]:
    """The transform of :func:`build_transform`, split into a deterministic step and a tensor step.

    ``prepare`` (a :class:`PrepareImage`) resizes the decoded image once: to ``resize_size`` for
    evaluation (then the tensor step's center crop gives exactly :func:`build_transform`'s output),
    and for training to the smallest size that the smallest random crop still samples at full
    resolution (``crop_size / sqrt(min_scale)``). Its output can be cached; the tensor step
    (torchvision.transforms.v2 on uint8 tensors) draws the random augmentation.

    Returns:
        ``(prepare, transform)``.
    """
    check_choice("augment", augment, AUGMENTATIONS)
    pre = getattr(preprocess, "preprocess", preprocess).at_resolution(resolution)
    interp = _interpolation(pre.interpolation)
    normalize = v2.Normalize(mean=list(pre.mean), std=list(pre.std))
    if not train or augment == "none":
        prepare = PrepareImage(pre.resize_size, interp, shrink_only=False)
        return prepare, v2.Compose([v2.CenterCrop(pre.crop_size), _ToFloat(), normalize])
    strong = augment == "strong"
    short = max(pre.resize_size, math.ceil(pre.crop_size / math.sqrt(MIN_CROP_SCALE[augment])))
    fill = [round(255 * m) for m in pre.mean]
    ops: list[Any] = [
        v2.RandomResizedCrop(pre.crop_size, scale=(MIN_CROP_SCALE[augment], 1.0), interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(20 if strong else 10, interpolation=InterpolationMode.BILINEAR, fill=fill),
    ]
    if strong:
        ops.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05))
    ops += [_ToFloat(), normalize]
    if strong:
        ops.append(v2.RandomErasing(p=0.25, value=0))
    return PrepareImage(short, interp, shrink_only=True), v2.Compose(ops)
