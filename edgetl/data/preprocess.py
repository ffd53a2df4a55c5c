"""One preprocessing from file to tensor (numpy and Pillow, no torch), and ``preprocess.json``, which describes it.

The steps, in order (what firmware must do too):

1. **Decode** with training's decoder (:mod:`edgetl.data.decode`): EXIF orientation applied, alpha
   composited on white, palette and CMYK converted, 16-bit scaled to 8 bits (``value / 257``, rounded).
2. **Resize** the shorter edge to ``resize.size``; the longer edge becomes ``floor(size * long / short)``
   (truncated, as torchvision computes it), with Pillow's filter of that name (antialiased).
3. **Center-crop** to ``crop.size`` (height, width): the offset on each axis is
   ``round((resized - crop) / 2)`` with ties to even (Python's ``round``); a crop larger than the image
   pads with zeros, ``(crop - resized) // 2`` before.
4. **Normalise** ``x = (pixel * scale - mean[c]) / std[c]`` in float32, channels in ``color_order``,
   laid out ``3 x H x W``.

This is torchvision's evaluation transform (Resize, CenterCrop, ToTensor, Normalize on a PIL image) step for
step, which ``tests/test_preprocess.py`` checks for every preprocessing of the catalog.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from edgetl._io import read_json
from edgetl.data.decode import ALPHA_BACKGROUND, to_rgb, try_decode
from edgetl.errors import ArtifactError, DataError

SCHEMA = 2
"""The version of ``preprocess.json``'s format; version 1 held the fields twice (see :func:`read_document`)."""
MAX_SIZE = 8192
"""The largest resize or crop size (pixels) a ``preprocess.json`` may give."""
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
"""Resize filters by name: Pillow's, which torchvision calls for a PIL image."""
COLOR_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW",)
FORMULA = "x = (pixel * scale - mean[c]) / std[c], pixels in 0..255, channels in color_order"
_DECODE = {"exif_orientation": True, "alpha_background": list(ALPHA_BACKGROUND), "high_bit_depth": "value / 257"}
_RESIZE_RULES = {"edge": "shorter", "long_edge": "floor", "antialias": True}
_CROP_RULES = {"mode": "center", "offset": "round_half_even"}


@dataclass(frozen=True)
class PreprocessSpec:
    """Every fact of the preprocessing, once: what ``preprocess.json`` holds and :func:`prepare` applies.

    Attributes:
        resize_size: the shorter edge after resizing.
        crop_size: the (height, width) of the center crop, the model's input.
        mean, std: per channel, in ``color_order``, applied after ``scale``.
        scale: the factor from 0..255 pixels to the range ``mean`` and ``std`` are in.
        interpolation: the resize filter (:data:`INTERPOLATIONS`).
        color_order: ``RGB`` or ``BGR``.
        layout: ``NCHW``.
    """

    resize_size: int
    crop_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0 / 255.0
    interpolation: str = "bilinear"
    color_order: str = "RGB"
    layout: str = "NCHW"

    @classmethod
    def from_preprocess(cls, preprocess: Any, resolution: int | None = None) -> PreprocessSpec:
        """The spec of a model card's :class:`~edgetl.zoo.catalog.Preprocess` (or a card), at ``resolution``."""
        if isinstance(preprocess, PreprocessSpec):
            return preprocess
        pre = getattr(preprocess, "preprocess", preprocess)
        base = pre
        pre = pre.at_resolution(resolution)
        return cls(int(pre.resize_size), (int(pre.crop_size), int(pre.crop_size)), tuple(map(float, pre.mean)),
                   tuple(map(float, pre.std)), float(base.scale), str(pre.interpolation), str(base.color_order),
                   str(base.layout))

    @property
    def input_shape(self) -> list[int]:
        """The model's input shape at batch 1."""
        return [1, 3, *self.crop_size]

    def to_document(self) -> dict[str, Any]:
        """The content of ``preprocess.json`` (schema :data:`SCHEMA`): each fact once, with the fixed rules
        spelled out for firmware."""
        return {
            "schema": SCHEMA,
            "decode": dict(_DECODE),
            "resize": {"size": self.resize_size, "interpolation": self.interpolation, **_RESIZE_RULES},
            "crop": {"size": list(self.crop_size), **_CROP_RULES},
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "color_order": self.color_order,
            "layout": self.layout,
            "dtype": "float32",
            "formula": FORMULA,
        }


# --- the one implementation ----------------------------------------------------------------------


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) after resizing the shorter edge to ``size``: torchvision's arithmetic, which
    truncates the longer edge (``_compute_resized_output_size``)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _offset(size: int, crop: int) -> int:
    if crop > size:
        return -((crop - size) // 2)  # padded with zeros, as torchvision's center_crop pads
    return round((size - crop) / 2.0)


def crop_box(width: int, height: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of a center crop of ``crop`` (height, width): torchvision's offsets."""
    left, top = _offset(width, crop[1]), _offset(height, crop[0])
    return left, top, left + crop[1], top + crop[0]


def decode(image: Any) -> Image.Image:
    """An image file (path) or a PIL image as 8-bit RGB, decoded as training decodes it.

    Raises:
        DataError: the file is missing or is not a readable image; the message names it.
    """
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image), ALPHA_BACKGROUND)
    decoded, reason = try_decode(image, ALPHA_BACKGROUND)
    if decoded is None:
        raise DataError(f"cannot read image {image}: {reason.splitlines()[0] if reason else 'unreadable'}")
    return decoded


def prepare(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded RGB image (see :func:`decode`) as the model's input: a ``3 x H x W`` float32 array.

    Resize the shorter edge, center-crop, scale, subtract the mean and divide by the std, in the spec's
    colour order (see the module's docstring for the exact arithmetic).
    """
    width, height = resized_size(*image.size, spec.resize_size)
    if (width, height) != image.size:
        image = image.resize((width, height), INTERPOLATIONS[spec.interpolation])
    pixels = np.asarray(image.crop(crop_box(width, height, spec.crop_size)))
    x = pixels.transpose(2, 0, 1).astype(np.float32)
    if spec.color_order == "BGR":
        x = np.ascontiguousarray(x[::-1])
    # dividing by 1 / scale (255.0 exactly for 1/255) rounds as ToTensor's ``x / 255`` does
    x /= np.float32(1.0 / spec.scale)
    x -= np.asarray(spec.mean, np.float32)[:, None, None]
    x /= np.asarray(spec.std, np.float32)[:, None, None]
    return x


def load_tensor(image: Any, spec: PreprocessSpec) -> np.ndarray:
    """:func:`decode` then :func:`prepare`: a file (or PIL image) as the model's ``3 x H x W`` input."""
    return prepare(decode(image), spec)


# --- reading preprocess.json ---------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, field: str, rule: str, value: Any) -> None:
        super().__init__(f"'{field}' must be {rule}, got {json.dumps(value, default=str)}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _size(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise _Bad(field, f"a whole number of pixels from 1 to {MAX_SIZE}", value)
    return value


def _triple(value: Any, field: str, positive: bool) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3 and all(_finite(v) and (v > 0 or not positive)
                                                               for v in value)):
        raise _Bad(field, "three finite numbers" + (" > 0" if positive else ""), value)
    return (float(value[0]), float(value[1]), float(value[2]))


def _choice(value: Any, field: str, choices: Any) -> Any:
    if value not in choices:
        raise _Bad(field, "one of " + ", ".join(json.dumps(c) for c in choices), value)
    return value


def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise _Bad(key, "a mapping", value)
    return value


def _rules(section: dict[str, Any], key: str, rules: dict[str, Any]) -> None:
    for name, expected in rules.items():
        _choice(section.get(name), f"{key}.{name}", [expected])


def _spec_v2(doc: dict[str, Any]) -> PreprocessSpec:
    known = {"schema", "decode", "resize", "crop", "scale", "mean", "std", "color_order", "layout", "dtype",
             "formula"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _Bad(unknown[0], "absent (not a field of schema 2)", doc[unknown[0]])
    decode_rules, resize, crop = _section(doc, "decode"), _section(doc, "resize"), _section(doc, "crop")
    _rules(decode_rules, "decode", _DECODE)
    _rules(resize, "resize", _RESIZE_RULES)
    _rules(crop, "crop", _CROP_RULES)
    _choice(doc.get("dtype"), "dtype", ["float32"])
    sizes = crop.get("size")
    if not (isinstance(sizes, list) and len(sizes) == 2):
        raise _Bad("crop.size", "[height, width]", sizes)
    scale = doc.get("scale")
    if not (_finite(scale) and scale > 0):
        raise _Bad("scale", "a finite number > 0", scale)
    return PreprocessSpec(
        resize_size=_size(resize.get("size"), "resize.size"),
        crop_size=(_size(sizes[0], "crop.size"), _size(sizes[1], "crop.size")),
        mean=_triple(doc.get("mean"), "mean", positive=False),
        std=_triple(doc.get("std"), "std", positive=True),
        scale=float(scale),
        interpolation=_choice(resize.get("interpolation"), "resize.interpolation", list(INTERPOLATIONS)),
        color_order=_choice(doc.get("color_order"), "color_order", COLOR_ORDERS),
        layout=_choice(doc.get("layout"), "layout", LAYOUTS),
    )


def _upgrade_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 document (the fields at the top and again under ``preprocess``) as schema 2, read once: the
    two copies must agree."""
    nested, resize, crop = _section(doc, "preprocess"), _section(doc, "resize"), _section(doc, "crop")
    pairs = {
        "resize.size": (resize.get("size"), nested.get("resize_size")),
        "resize.interpolation": (resize.get("interpolation"), nested.get("interpolation")),
        "crop.size": (crop.get("size"), [nested.get("crop_size")] * 2),
        **{key: (doc.get(key), nested.get(key)) for key in ("scale", "mean", "std", "color_order", "layout")},
    }
    for field, (top, inner) in pairs.items():
        if top != inner:
            raise _Bad(f"preprocess.{field}", f"equal to the top-level '{field}' ({json.dumps(top)})", inner)
    shape = [1, 3, *crop["size"]] if isinstance(crop.get("size"), list) else None
    if doc.get("input_shape", shape) != shape:
        raise _Bad("input_shape", f"{json.dumps(shape)}, from crop.size", doc.get("input_shape"))
    return {
        "schema": SCHEMA, "decode": dict(_DECODE), "dtype": doc.get("dtype", "float32"),
        "resize": {"size": resize.get("size"), "interpolation": resize.get("interpolation"), **_RESIZE_RULES},
        "crop": {"size": crop.get("size"), **_CROP_RULES},
        **{key: doc.get(key) for key in ("scale", "mean", "std", "color_order", "layout")},
    }


def spec_from_document(doc: Any) -> PreprocessSpec:
    """Validate a ``preprocess.json`` document (schema 2, or schema 1 whose two copies agree) into a spec.

    Raises:
        ValueError: the first field that is wrong, named, with its value.
    """
    if not isinstance(doc, dict):
        raise ValueError("the document must be a mapping")
    try:
        if "schema" not in doc and "preprocess" in doc:
            doc = _upgrade_v1(doc)
        _choice(doc.get("schema"), "schema", [SCHEMA])
        return _spec_v2(doc)
    except _Bad as exc:
        raise ValueError(str(exc)) from None


def read_spec(path: str | os.PathLike[str]) -> PreprocessSpec:
    """Read and validate a ``preprocess.json`` file.

    Raises:
        ArtifactError: the file is missing, is not JSON, or a field is wrong; one line naming the file and field.
    """
    path = Path(path)
    doc = read_json(path, ArtifactError, "re-export the artifact")
    try:
        return spec_from_document(doc)
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}; re-export the artifact") from None
