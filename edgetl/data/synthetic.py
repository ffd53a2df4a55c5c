"""The synthetic dataset of ``edgetl demo``: small, deterministic class folders of drawn textures or shapes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edgetl._io import atomic_write_json
from edgetl.data.options import check_choice
from edgetl.data.splits import SPLITS
from edgetl.errors import DataError

log = logging.getLogger(__name__)

DEMO_TEXTURES = ("stripes", "checker", "dots", "rings", "waves", "grid")
DEMO_SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "crescent")
DEMO_KINDS = {"textures": DEMO_TEXTURES, "shapes": DEMO_SHAPES}
_DEMO_VERSION = 1
_DEMO_META = "demo.json"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Draw = Callable[[np.random.Generator, str, int], Image.Image]
"""Draws one image of a class: (generator, class name, size) -> image."""


def make_demo_dataset(
    root: str | os.PathLike[str],
    num_classes: int = 4,
    train_per_class: int = 48,
    val_per_class: int = 16,
    test_per_class: int = 0,
    size: int = 64,
    seed: int = 0,
    kind: str = "textures",
) -> Path:
    """Write a small, deterministic class-folder dataset of drawn textures or shapes.

    ``kind="textures"`` (the default) draws the first ``num_classes`` of :data:`DEMO_TEXTURES`
    (stripes, checker, dots, rings, waves, grid): a patch of the texture, in two random colours of
    different brightness, at a random period, phase and orientation, inside a random ellipse or
    quadrilateral. ``kind="shapes"`` draws one of :data:`DEMO_SHAPES` (circle, square, triangle,
    star, ...) in a random colour, size, position, rotation and shear; shapes are much harder to
    learn from scratch and suit pretrained backbones. Both put the object on a noisy two-colour
    gradient background (sometimes striped) with distractor lines, arcs and dots, and add pixel noise
    and occasional blur, so that a small CNN learns the task but does not reach 100%.

    Images are drawn at twice ``size`` and downsampled (anti-aliasing). Each image has its own
    generator seeded by (seed, split, class, index), so the files are identical across runs.

    The layout is ``root/train/<class>/*.png``, ``root/val/<class>/*.png`` and, when
    ``test_per_class > 0``, ``root/test/<class>/*.png``, plus ``root/demo.json`` with the parameters.
    The dataset is built beside ``root`` and renamed into place, so an interrupted run leaves nothing
    that looks finished. If ``root`` already holds a demo dataset with the same parameters it is reused.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: bad parameters, or ``root`` exists and is not an empty folder or a demo dataset.
    """
    root = Path(root).expanduser()
    classes = _demo_classes(kind, num_classes)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    _check_sizes(counts, size)
    meta = _meta(kind, classes, counts, size, seed)
    if _demo_meta(root) == meta:
        log.info("reusing the demo dataset in %s", root)
        return root
    if root.exists() and not (root.is_dir() and (not any(root.iterdir()) or _demo_meta(root))):
        raise DataError(f"{root} exists and is not an edgetl demo dataset; choose a new or empty folder")
    with _staging_beside(root) as staging:
        _draw_images(staging, kind, classes, counts, size, seed)
        atomic_write_json(staging / _DEMO_META, meta)
        _replace_dir(staging, root, meta)
    log.info("wrote a %d-class %s demo dataset to %s", num_classes, kind, root)
    return root


def _demo_classes(kind: str, num_classes: int) -> list[str]:
    check_choice("demo dataset kind", kind, tuple(DEMO_KINDS))
    names = DEMO_KINDS[kind]
    if not 2 <= num_classes <= len(names):
        raise DataError(f"num_classes must be between 2 and {len(names)} for {kind}, got {num_classes}")
    return list(names[:num_classes])


def _check_sizes(counts: dict[str, int], size: int) -> None:
    if counts["train"] < 1 or counts["val"] < 0 or counts["test"] < 0:
        raise DataError("train_per_class must be >= 1 and val_per_class, test_per_class >= 0")
    if size < 16:
        raise DataError(f"size must be at least 16 pixels, got {size}")


def _meta(kind: str, classes: list[str], counts: dict[str, int], size: int, seed: int) -> dict:
    """What ``demo.json`` records: a dataset is reused only if it was drawn with exactly these."""
    return {
        "generator": "edgetl.data.make_demo_dataset",  # its former home; a new name would redraw every dataset
        "version": _DEMO_VERSION,
        "kind": kind,
        "classes": classes,
        "train_per_class": counts["train"],
        "val_per_class": counts["val"],
        "test_per_class": counts["test"],
        "size": size,
        "seed": seed,
    }


@contextlib.contextmanager
def _staging_beside(root: Path) -> Iterator[Path]:
    """A new hidden folder beside ``root``; removed on exit unless it was renamed to ``root``."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _draw_images(staging: Path, kind: str, classes: list[str], counts: dict[str, int], size: int, seed: int) -> None:
    """Draw every image into ``staging/<split>/<class>/``, each from a generator of (seed, split, class, index)."""
    draw: Draw = _texture_image if kind == "textures" else _shape_image
    for split_id, split in enumerate(SPLITS):
        for class_id, name in enumerate(classes):
            if counts[split] == 0:
                continue
            folder = staging / split / name
            folder.mkdir(parents=True)
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                draw(rng, name, size).save(folder / f"{name}_{i:04d}.png", format="PNG")


def _demo_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / _DEMO_META).read_text())
    except (OSError, ValueError):
        return None


def _replace_dir(staging: Path, root: Path, meta: dict) -> None:
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old.{os.getpid()}")
        os.replace(root, old)
    try:
        os.replace(staging, root)
    except OSError:
        if _demo_meta(root) != meta:  # unless a concurrent writer produced the same dataset
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def contrasting_colour(rng: np.random.Generator, other: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random colour whose luminance differs from ``other``'s by at least ``min_contrast`` (0..1)."""
    for _ in range(50):
        colour = _random_colour(rng)
        if abs(float((colour - other) @ _LUMA)) >= 255 * min_contrast:
            return colour
    return np.full(3, 0.0 if float(other @ _LUMA) > 127 else 255.0, dtype=np.float32)


def demo_background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A two-colour linear gradient at a random angle, sometimes with faint stripes (a hard negative)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    bg = _random_colour(rng) * (1 - t) + _random_colour(rng) * t
    if rng.random() < 0.4:
        a, freq = rng.uniform(0, np.pi), rng.uniform(4, 12)
        stripes = np.sin(2 * np.pi * freq * (np.cos(a) * xx + np.sin(a) * yy))[..., None]
        bg = bg + stripes * rng.uniform(10, 35) * (rng.random(3) - 0.5).astype(np.float32) * 2
    return bg


def draw_clutter(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Distractors that belong to no class: lines, small dots and arcs in random colours."""
    draw = ImageDraw.Draw(image)
    side = image.size[0]
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, 4))
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int(rng.integers(1, 4)) * side // 64))
        elif kind == 1:
            x, y = rng.uniform(0, side, 2)
            rad = rng.uniform(0.01, 0.035) * side
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=colour)
        else:
            x, y = rng.uniform(0, side, 2)
            rad = rng.uniform(0.1, 0.3) * side
            start = float(rng.uniform(0, 360))
            box = (float(x - rad), float(y - rad), float(x + rad), float(y + rad))
            draw.arc(box, start, start + float(rng.uniform(40, 120)), fill=colour, width=max(1, side // 64))


def finish_image(rng: np.random.Generator, canvas: Image.Image, size: int) -> Image.Image:
    """Downsample to ``size``, blur a quarter of the images slightly and add pixel noise."""
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 18), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def texture_field(rng: np.random.Generator, texture: str, side: int) -> np.ndarray:
    """A 0/1 pattern of ``texture`` at a random period, phase and orientation."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = side * rng.uniform(0.1, 0.22)
    u = (np.cos(theta) * xx + np.sin(theta) * yy) / period + rng.random()
    v = (-np.sin(theta) * xx + np.cos(theta) * yy) / period + rng.random()
    if texture == "stripes":
        field_ = np.mod(u, 1.0) < rng.uniform(0.35, 0.65)
    elif texture == "checker":
        field_ = np.mod(np.floor(u) + np.floor(v), 2) == 1
    elif texture == "dots":
        field_ = np.hypot(np.mod(u, 1.0) - 0.5, np.mod(v, 1.0) - 0.5) < rng.uniform(0.2, 0.32)
    elif texture == "rings":
        cx, cy = rng.uniform(0, side, 2)
        field_ = np.mod(np.hypot(xx - cx, yy - cy) / period, 1.0) < 0.5
    elif texture == "waves":
        wavy = u + rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * v / rng.uniform(1.5, 3.0))
        field_ = np.mod(wavy, 1.0) < 0.5
    elif texture == "grid":
        w = rng.uniform(0.12, 0.22)
        field_ = (np.mod(u, 1.0) < w) | (np.mod(v, 1.0) < w)
    else:  # pragma: no cover - names come from DEMO_TEXTURES
        raise ValueError(texture)
    return field_.astype(np.float32)


def _region_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random ellipse or quadrilateral over a good part of the image, as an (H, W, 1) 0..1 array."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    r = side * rng.uniform(0.5, 0.85)
    cx, cy = rng.uniform(0.3 * side, 0.7 * side, 2)
    if rng.random() < 0.5:
        rx, ry = r * rng.uniform(0.7, 1.0, 2)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.arange(4) * np.pi / 2 + rng.uniform(-0.4, 0.4, 4)
        radii = r * rng.uniform(0.8, 1.1, 4)
        corners = [(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for q, a in zip(radii, angles, strict=True)]
        draw.polygon(corners, fill=255)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def _texture_image(rng: np.random.Generator, texture: str, size: int) -> Image.Image:
    side = 2 * size
    bg = demo_background(rng, side)
    pattern = texture_field(rng, texture, side)[..., None]
    c1 = _random_colour(rng)
    c2 = contrasting_colour(rng, c1, 0.25)
    region = _region_mask(rng, side)
    textured = c1 * (1 - pattern) + c2 * pattern
    canvas = Image.fromarray(np.clip(bg * (1 - region) + textured * region, 0, 255).astype(np.uint8))
    draw_clutter(rng, canvas, int(rng.integers(0, 4)))
    return finish_image(rng, canvas, size)


def shape_mask(rng: np.random.Generator, shape: str, side: int) -> Image.Image:
    """A white-on-black mask of ``shape`` with random size, position, rotation and shear."""
    r = side * rng.uniform(0.16, 0.32)
    margin = 0.7 * r
    cx, cy = rng.uniform(margin, side - margin, 2)
    theta = rng.uniform(0, 2 * np.pi)
    shear = np.eye(2) + rng.uniform(-0.15, 0.15, (2, 2))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    affine = rot @ shear

    def poly(radii: np.ndarray, angles: np.ndarray, dx: float = 0.0) -> list[tuple[float, float]]:
        pts = np.stack([radii * np.cos(angles) + dx, radii * np.sin(angles)], axis=1) @ affine.T
        return [(float(x + cx), float(y + cy)) for x, y in pts]

    def regular(n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return poly(np.full(n, radius), np.arange(n) * 2 * np.pi / n + phase)

    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.polygon(regular(72, r), fill=255)
    elif shape == "square":
        draw.polygon(regular(4, r, np.pi / 4), fill=255)
    elif shape == "triangle":
        draw.polygon(regular(3, r), fill=255)
    elif shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        draw.polygon(poly(radii, np.arange(10) * np.pi / 5), fill=255)
    elif shape == "cross":
        w = r * rng.uniform(0.3, 0.42)
        xs = np.array([w, w, r, r, w, w, -w, -w, -r, -r, -w, -w])
        ys = np.array([r, w, w, -w, -w, -r, -r, -w, -w, w, w, r])
        draw.polygon(poly(np.hypot(xs, ys), np.arctan2(ys, xs)), fill=255)
    elif shape == "hexagon":
        draw.polygon(regular(6, r), fill=255)
    elif shape == "ring":
        draw.polygon(regular(72, r), fill=255)
        draw.polygon(regular(72, r * rng.uniform(0.45, 0.65)), fill=0)
    elif shape == "crescent":
        draw.polygon(regular(72, r), fill=255)
        radius = np.full(72, r * rng.uniform(0.8, 1.0))
        draw.polygon(poly(radius, np.linspace(0, 2 * np.pi, 72, endpoint=False), r * rng.uniform(0.35, 0.6)), fill=0)
    else:  # pragma: no cover - names come from DEMO_SHAPES
        raise ValueError(shape)
    return mask


def _shape_image(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    side = 2 * size
    bg = demo_background(rng, side)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw_clutter(rng, canvas, int(rng.integers(1, 5)))
    colour = contrasting_colour(rng, bg.reshape(-1, 3).mean(0), 0.25)
    canvas.paste(tuple(int(c) for c in colour), mask=shape_mask(rng, shape, side))
    draw_clutter(rng, canvas, int(rng.integers(0, 3)))  # some distractors cross the shape
    return finish_image(rng, canvas, size)
