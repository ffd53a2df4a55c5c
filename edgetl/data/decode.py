"""Robust image decoding to 8-bit RGB, and the scan-time check of which files of a dataset decode.

Every image comes out of :func:`load_rgb` as 8-bit RGB, whatever its mode (grayscale, RGBA, palette,
16-bit, CMYK) and with its EXIF orientation applied. Transparent pixels are composited on **white**
(:data:`ALPHA_BACKGROUND`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgetl.errors import DataError

ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on this colour (white), like an image viewer on a light page."""
FULL_CHECK_MAX_BYTES = 64 * 2**20
"""``check="auto"`` decodes every image at scan time when the dataset is at most this many bytes."""
MAX_IMAGE_BYTES = 1 << 30
"""An image file larger than this is refused before it is opened."""
MAX_IMAGE_PIXELS = 89_478_485
"""An image with more pixels than this (Pillow's default decompression-bomb threshold, about 9459 x 9459) is
refused from its header, before it is decoded; Pillow itself would only warn up to twice as many."""

log = logging.getLogger(__name__)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, palette transparency) is composited on ``background``. 16-bit and 32-bit
    integer images are scaled from their full range (``value / 257`` for 16-bit data) instead of being
    clipped at 255 as ``Image.convert`` does; float images in [0, 1] are scaled by 255, other float or
    int ranges are min-max stretched. CMYK and YCbCr go through Pillow's conversion.

    Raises:
        DataError: the mode cannot be converted to RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        base = Image.new("RGB", image.size, background)
        base.paste(image, mask=image.getchannel("A"))
        return base
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _wide_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise DataError(f"images of mode {mode} are not supported ({exc}); convert them to RGB") from exc


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    arr = np.asarray(image)
    if arr.ndim == 3:  # e.g. a 16-bit multi-channel TIFF opened as an array
        arr = arr[..., :3]
    if image.mode.startswith("I;16"):
        out = np.round(arr.astype(np.float64) / 257.0)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0
        elif image.mode != "F" and lo >= 0.0 and hi <= 65535.0:
            out = arr / 257.0  # mode "I" holding 16-bit data (PNG/TIFF)
        else:
            out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    gray = np.clip(np.nan_to_num(out), 0, 255).astype(np.uint8)
    if gray.ndim == 2:
        return Image.fromarray(gray).convert("RGB")
    return Image.fromarray(gray, "RGB")


def file_problem(path: str | os.PathLike[str], max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """Why ``path`` is not a file edgetl may read, or "" if it is: a regular file of at most ``max_bytes``.

    It only stats the path, so a named pipe or a device is refused without being opened (opening a FIFO
    blocks until something writes to it).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if info.st_size > max_bytes:
        return f"is {info.st_size / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB limit for an image"
    return ""


def open_header(path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` (the header only) without Pillow's decompression-bomb warning: :func:`pixel_problem` judges
    the size, in one line that names the file, before anything is decoded.

    Raises:
        DataError: the image is so large that Pillow refuses to open it (over twice its limit).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "too many pixels"
            raise DataError(_too_many(size)) from None


def pixel_problem(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """Why an opened (not yet decoded) image is too large to decode, or "" (from its header alone)."""
    width, height = image.size
    return _too_many(f"{width}x{height} pixels", max_pixels) if width * height > max_pixels else ""


def _too_many(size: str, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    return f"is {size}, over the {max_pixels / 1e6:.0f}-megapixel limit for an image; downscale it"


def try_decode(path: str | os.PathLike[str], background: tuple[int, int, int]) -> tuple[Image.Image | None, str]:
    """Decode ``path`` fully; return (image, "") or (None, reason)."""
    problem = file_problem(path)
    if problem:
        return None, problem
    try:
        with open_header(path) as im:
            too_big = pixel_problem(im)
            if too_big:
                return None, too_big
            im.load()
            oriented = ImageOps.exif_transpose(im)
            rgb = to_rgb(oriented, background)
            if rgb is im:
                rgb = im.copy()  # detach from the file handle that the with-block closes
            return rgb, ""
    except DataError as exc:
        return None, str(exc)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def load_rgb(path: str | os.PathLike[str], background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Decode an image file fully and return it as an 8-bit RGB PIL image, EXIF orientation applied.

    Args:
        path: the image file.
        background: the colour transparent pixels are composited on (white by default).

    Raises:
        DataError: the file is missing, truncated, corrupt or not an image; the message names it.
    """
    image, reason = try_decode(path, background)
    if image is None:
        raise DataError(f"cannot decode image {path}: {reason}; replace or remove the file")
    return image


def check_image(path: str | os.PathLike[str], full: bool = True) -> str:
    """Return why ``path`` is not a usable image, or "" if it is.

    ``full=False`` only parses the header (PIL ``verify()``, which also checks PNG chunk CRCs); it
    does not notice a truncated JPEG. ``full=True`` decodes the whole image.
    """
    problem = file_problem(path)
    if problem:
        return problem
    if os.path.getsize(path) == 0:
        return "empty file"
    if full:
        return try_decode(path, ALPHA_BACKGROUND)[1]
    try:
        with open_header(path) as im:
            too_big = pixel_problem(im)
            if too_big:
                return too_big
            im.verify()
    except DataError as exc:
        return str(exc)
    except Exception as exc:  # verify() raises a variety of exceptions on corrupt data
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ""


def check_images(paths: list[Path], check: str, on_bad_image: str) -> list[tuple[Path, str]]:
    """Return ``(path, reason)`` for each of ``paths`` that is not a usable image, checked in threads.

    ``check`` is ``"full"``, ``"header"``, ``"none"`` or ``"auto"`` (full when the files total at most
    :data:`FULL_CHECK_MAX_BYTES`, headers otherwise); see :func:`edgetl.data.scan_dataset`.

    Raises:
        DataError: a file is bad and ``on_bad_image`` is ``"error"``; the message names the first one.
    """
    if check == "none" or not paths:
        return []
    full = check == "full"
    if check == "auto":
        total = 0
        for p in paths:
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        full = total <= FULL_CHECK_MAX_BYTES
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        reasons = list(pool.map(lambda p: check_image(p, full=full), paths, chunksize=32))
    bad = [(p, r) for p, r in zip(paths, reasons) if r]  # noqa: B905 (the board runs Python 3.8: no strict=)
    log.info(
        "checked %d images (%s) in %.1f s: %d unreadable",
        len(paths),
        "full decode" if full else "headers",
        time.perf_counter() - start,
        len(bad),
    )
    if bad and on_bad_image == "error":
        path, reason = bad[0]
        more = f" ({len(bad)} bad files in total)" if len(bad) > 1 else ""
        raise DataError(f"cannot decode image {path}: {reason}{more}; replace or remove it, or use on_bad_image='skip'")
    return bad
