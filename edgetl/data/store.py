"""The decoded-image cache: every image decoded and resized once, kept in memory as a uint8 tensor.

Decoding (JPEG/PNG) and the first resize are the same every epoch, so when the resized training set
fits a memory budget (:func:`memory_budget`: a quarter of the free RAM) the loader reads tensors from a
:class:`DecodedStore` instead of files. Augmentation still runs per epoch, on the tensors, seeded per
image as before, so a cached and an uncached run compute the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from edgetl.data.decode import ALPHA_BACKGROUND, open_header, try_decode
from edgetl.errors import DataError

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
BUDGET_FRACTION = 0.25


def available_memory() -> int | None:
    """Bytes of RAM available to new allocations (``MemAvailable``), or None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def memory_budget(fraction: float = BUDGET_FRACTION) -> int:
    """The bytes a decoded-image cache may take: ``fraction`` of the available RAM (0 if unknown)."""
    free = available_memory()
    return int(free * fraction) if free else 0


def estimate_bytes(records: Sequence[tuple[str | os.PathLike[str], int]], shape_of: Callable[[int, int], tuple]) -> int:
    """Bytes the decoded images would take, from the file headers (no decoding).

    Args:
        records: ``(path, label)`` pairs.
        shape_of: ``(width, height) -> (height, width)`` of the stored image (``PrepareImage.stored_shape``).
    """
    total = 0
    for path, _ in records:
        try:
            with open_header(path) as im:
                h, w = shape_of(*im.size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, DataError):
            continue  # unreadable: stored as nothing
        total += 3 * h * w
    return total


class DecodedStore:
    """Decoded, resized uint8 images by record index; unreadable files keep their reason instead."""

    def __init__(self, images: list[torch.Tensor | None], reasons: list[str]) -> None:
        self.images, self.reasons = images, reasons

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str]:
        return self.images[index], self.reasons[index]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.images if t is not None)

    @classmethod
    def build(cls, records: Sequence[tuple[str | os.PathLike[str], int]],
              prepare: Callable[[Image.Image], torch.Tensor], background: tuple[int, int, int] = ALPHA_BACKGROUND,
              threads: int | None = None) -> DecodedStore:
        """Decode and prepare every record once, in threads (Pillow releases the GIL while decoding)."""
        def load(record: tuple[str | os.PathLike[str], int]) -> tuple[torch.Tensor | None, str]:
            image, reason = try_decode(record[0], background)
            return (None, reason) if image is None else (prepare(image), "")

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(load, records, chunksize=16))
        store = cls([t for t, _ in loaded], [r for _, r in loaded])
        log.info("decoded %d images once into %.0f MB in %.1f s", len(store), store.nbytes / 2**20,
                 time.perf_counter() - start)
        return store
