"""Classify images: the top-K labels with their probabilities, from a model source.

``SOURCE`` is, for now, a catalog name (``timm/tf_efficientnet_lite0``, ``resnet18.IMAGENET1K_V1``) with its
ImageNet weights (``weights``/``weights_dir`` as in :func:`edgetl.weights.load_model`), prepared with the card's
own preprocessing and labelled with ImageNet's class names. Artifact folders and finetune run folders are
further kinds of source: each is a :class:`Classifier` (labels, a transform, a forward function), and
:func:`open_source` is the one place that tells them apart.

Not to be confused with :mod:`edgetl.predict`, the latency predictor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The top-K classes of one image, most probable first."""

    image: str
    labels: tuple[str, ...]
    indices: tuple[int, ...]
    probabilities: tuple[float, ...]

    @property
    def label(self) -> str:
        """The top-1 label."""
        return self.labels[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the image and its ranked ``{label, index, probability}`` entries."""
        return {
            "image": self.image,
            "top": [
                {"label": lab, "index": i, "probability": round(p, 6)}
                for lab, i, p in zip(self.labels, self.indices, self.probabilities, strict=True)
            ],
        }


@dataclass
class Classifier:
    """What prediction needs from a source: class names, the image transform and a forward pass to logits."""

    name: str
    labels: Sequence[str]
    transform: Callable[[Image.Image], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]


def open_source(
    source: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = "imagenet",
    weights_dir: str | os.PathLike[str] | None = None,
) -> Classifier:
    """Open a prediction source as a :class:`Classifier`.

    Raises:
        ConfigError: ``source`` is a folder (artifact and run folders are not supported by this version).
        UnknownNameError: ``source`` is not a catalog name.
        WeightsError: the weights are not on this machine.
    """
    if Path(source).is_dir():
        raise ConfigError(
            f"{source} is a folder; predicting from an artifact or run folder is not supported yet, "
            "pass a catalog name such as timm/tf_efficientnet_lite0"
        )
    return _catalog_classifier(str(source), weights, weights_dir)


def _catalog_classifier(name: str, weights: Any, weights_dir: Any) -> Classifier:
    import torch

    from edgetl.data import build_transform
    from edgetl.weights import load_model

    loaded = load_model(name, weights=weights, weights_dir=weights_dir)
    card = loaded.card
    labels = list(card.categories) or [f"class_{i}" for i in range(card.num_classes)]
    model = loaded.model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return Classifier(card.id, labels, build_transform(card.preprocess, train=False), forward)


def _open_image(image: Any) -> tuple[str, Image.Image]:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return "<image>", image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as img:
            return str(path), img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {str(exc).splitlines()[0]}") from exc


def classify(classifier: Classifier, images: Sequence[Any], top: int = 5, batch_size: int = 16) -> list[Prediction]:
    """Run ``classifier`` on ``images`` (paths or PIL images) and return each one's top-``top`` classes."""
    import torch

    if top < 1:
        raise ConfigError(f"top must be at least 1, got {top}")
    k = min(top, len(classifier.labels))
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        opened = [_open_image(im) for im in images[start : start + batch_size]]
        batch = torch.stack([classifier.transform(img) for _, img in opened])
        probs = classifier.forward(batch).float().softmax(dim=-1)
        values, indices = probs.topk(k, dim=-1)
        for (name, _), v, i in zip(opened, values.tolist(), indices.tolist(), strict=True):
            out.append(Prediction(name, tuple(classifier.labels[j] for j in i), tuple(i), tuple(v)))
    return out


def predict(
    source: str | os.PathLike[str],
    images: Sequence[Any],
    top: int = 5,
    weights: str | os.PathLike[str] | None = "imagenet",
    weights_dir: str | os.PathLike[str] | None = None,
) -> list[Prediction]:
    """Classify images with a model source and return the top-K labels with probabilities, per image.

    Args:
        source: a catalog name (``timm/tf_efficientnet_lite0``); artifact and run folders come later.
        images: image paths (or PIL images), classified in order.
        top: how many classes to return per image.
        weights: ``imagenet`` (default), ``none`` or a PATH, as for :func:`edgetl.weights.load_model`.
        weights_dir: the offline weights folder (default ``$EDGETL_WEIGHTS_DIR``).

    Returns:
        One :class:`Prediction` per image, in the order given.

    Raises:
        EdgetlError: an unknown name, missing weights, an unreadable image or a bad ``top``; one line each.
    """
    if not images:
        raise ConfigError("no images given; pass one or more image files")
    classifier = open_source(source, weights=weights, weights_dir=weights_dir)
    if weights is None or str(weights).lower() == "none":
        log.warning("%s has random weights: its predictions mean nothing", classifier.name)
    return classify(classifier, list(images), top=top)
