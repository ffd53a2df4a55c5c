"""Datasets and loaders over ``(path, label)`` records that survive unreadable files.

This module imports torch: :mod:`edgetl.data` loads it on first use of one of its names.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler, default_collate

from edgetl.data.decode import ALPHA_BACKGROUND, try_decode
from edgetl.data.options import ON_BAD_IMAGE, check_choice
from edgetl.data.store import DecodedStore
from edgetl.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadSample:
    """What :class:`ImageDataset` returns for an unreadable file under ``on_bad_image="skip"``."""

    path: str
    reason: str


def collate_skip_bad(batch: list[Any]) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Collate ``(tensor, label)`` samples, dropping :class:`BadSample` entries.

    Returns:
        ``(images, labels, bad)`` where ``bad`` lists ``(path, reason)`` of the dropped samples;
        ``images`` and ``labels`` are ``None`` when every sample of the batch was bad.
    """
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    images, labels = default_collate(good)
    return images, labels, bad


class ImageDataset(Dataset):
    """A map-style dataset of ``(path, label)`` records that yields ``(transform(image), label)``.

    Under ``on_bad_image="skip"`` an unreadable file yields a :class:`BadSample` instead, which
    :func:`collate_skip_bad` (used by :func:`make_loader`) drops from its batch and reports; under
    ``"error"`` it raises :class:`DataError` naming the file.

    Args:
        records: ``(path, label)`` pairs.
        transform: applied to the RGB PIL image (e.g. from :func:`build_transform`); None keeps the image.
        on_bad_image: ``"skip"`` or ``"error"``.
        background: the colour transparent pixels are composited on.
        seed: if given, each image's random augmentation is drawn from a generator seeded by
            ``(seed, epoch, index)`` (see :meth:`set_epoch`), the same in any worker process and
            with any number of workers; persistent workers never see a reseeded loader, so
            seeding per image is what makes a resumed run draw the same crops.
        prepare: a deterministic step applied to the decoded image before ``transform`` (e.g.
            :class:`~edgetl.data.transforms.PrepareImage`: resize once, to a uint8 tensor).
        store: the prepared images, decoded once (a :class:`~edgetl.data.store.DecodedStore` over
            ``records``); files are not read again.
    """

    def __init__(
        self,
        records: Sequence[tuple[str | os.PathLike[str], int]],
        transform: Callable[[Image.Image], Any] | None = None,
        on_bad_image: str = "skip",
        background: tuple[int, int, int] = ALPHA_BACKGROUND,
        seed: int | None = None,
        prepare: Callable[[Image.Image], Any] | None = None,
        store: DecodedStore | None = None,
    ) -> None:
        check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
        self.records = [(str(p), int(y)) for p, y in records]
        self.prepare, self.store = prepare, store
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.background = background
        self.seed = seed
        # in shared memory, so that worker processes (persistent or not) see set_epoch()
        self._epoch = None if seed is None else torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation :meth:`__getitem__` draws (with ``seed``)."""
        if self._epoch is not None:
            self._epoch.fill_(int(epoch))

    def _transform(self, image: Image.Image, index: int) -> Any:
        if self.seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only, which is all the transforms draw from: torch.manual_seed would also
            # queue a seed for every lazily initialised accelerator, formatting a stack trace for each, per image
            torch.default_generator.manual_seed(
                (self.seed * 1_000_003 + int(self._epoch) * 7_919 + index * 104_729) % 2**63)
            return self.transform(image)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[Any, str]:
        if self.store is not None:
            return self.store[index]
        image, reason = try_decode(self.records[index][0], self.background)
        if image is not None and self.prepare is not None:
            image = self.prepare(image)
        return image, reason

    def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
        path, label = self.records[index]
        image, reason = self._load(index)
        if image is None:
            if self.on_bad_image == "error":
                raise DataError(f"cannot decode image {path}: {reason}; replace or remove the file")
            return BadSample(path, reason)
        return (self._transform(image, index) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        """The label of every record, in order."""
        return [y for _, y in self.records]


class ImageLoader(DataLoader):
    """A DataLoader that yields ``(images, labels)`` and handles unreadable files in the main process.

    Files that fail to decode in a worker come back with their batch; each is warned about once
    (by name) and appended to :attr:`skipped` (shared with ``DatasetSplits.skipped`` when passed),
    or raises :class:`DataError` under ``on_bad_image="error"``.
    """

    def __init__(self, *args: Any, on_bad_image: str = "skip", skipped: list | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_bad_image = on_bad_image
        self.skipped: list[tuple[Path, str]] = skipped if skipped is not None else []
        self._seen_bad = {str(p) for p, _ in self.skipped}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in super().__iter__():
            for path, reason in bad:
                self._record_bad(path, reason)
            if images is not None:
                yield images, labels

    def _record_bad(self, path: str, reason: str) -> None:
        if self.on_bad_image == "error":
            raise DataError(f"cannot decode image {path}: {reason}; replace or remove it, or skip bad images")
        if path in self._seen_bad:
            return
        self._seen_bad.add(path)
        self.skipped.append((Path(path), reason))
        log.warning("skipping unreadable image %s: %s", path, reason)


def balanced_sampler(labels: Sequence[int], num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """A sampler that draws every class equally often (weights ``1 / class count``, with replacement)."""
    counts = Counter(labels)
    weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=num_samples or len(labels), replacement=True, generator=generator)


def make_loader(
    records: Sequence[tuple[str | os.PathLike[str], int]],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    balance: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
    on_bad_image: str = "skip",
    drop_last: bool = False,
    skipped: list | None = None,
    prepare: Callable[[Image.Image], Any] | None = None,
    store: DecodedStore | None = None,
) -> DataLoader:
    """Build a DataLoader over ``(path, label)`` records that survives unreadable files.

    Args:
        records: ``(path, label)`` pairs, e.g. ``splits.train``.
        transform: from :func:`build_transform`.
        batch_size: images per batch (a batch is smaller when it held an unreadable file).
        shuffle: reshuffle every epoch (seeded by ``seed``); ignored with ``balance`` or ``sampler``.
        num_workers: decoding processes; workers are persistent across epochs when > 0. A loader that
            shuffles or samples seeds each image's augmentation from (seed, epoch, index), so the crops
            do not depend on the number of workers and a resumed run draws the same ones.
        device: the training device; memory is pinned when it is a CUDA device.
        balance: draw classes equally often with a :class:`~torch.utils.data.WeightedRandomSampler`.
        sampler: a custom sampler (e.g. a ``DistributedSampler``); exclusive with ``balance``.
        seed: seeds shuffling, the balanced sampler and the workers' augmentation.
        on_bad_image: ``"skip"`` (warn, drop from the batch and append to ``skipped``) or ``"error"``.
        drop_last: drop the last incomplete batch.
        skipped: a list to append skipped files to (pass ``splits.skipped`` for the run summary);
            also available as ``loader.skipped``.
        prepare: a deterministic step before ``transform`` (see :class:`ImageDataset`).
        store: ``records`` decoded and prepared once (see :class:`ImageDataset`).

    Raises:
        DataError: ``records`` is empty.
    """
    _check_loader_args(records, on_bad_image, balance, sampler)
    random_order = shuffle or sampler is not None or balance
    dataset = ImageDataset(records, transform, on_bad_image="skip", seed=seed if random_order else None,
                           prepare=prepare, store=store)
    if balance:
        sampler = balanced_sampler(dataset.targets, seed=seed)
    return ImageLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, collate_fn=collate_skip_bad, pin_memory=_pin_memory(device), drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), on_bad_image=on_bad_image, skipped=skipped,
        **_worker_options(num_workers),
    )


def _check_loader_args(records: Sequence[Any], on_bad_image: str, balance: bool, sampler: Sampler | None) -> None:
    check_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    if not records:
        raise DataError("no images to load: the split is empty; add images or change val_split/test_split")
    if balance and sampler is not None:
        raise ValueError("pass either balance=True or a sampler, not both")


def _pin_memory(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _worker_options(num_workers: int) -> dict[str, Any]:
    """Persistent workers that prefetch two batches each; DataLoader refuses these options without workers."""
    if num_workers <= 0:
        return {}
    socket_safe_multiprocessing_tempdir()
    return {"persistent_workers": True, "prefetch_factor": 2}


_SUN_PATH_MAX = 107
"""The longest path a Unix socket can be bound to on Linux (``sun_path`` is 108 bytes with its NUL)."""
_LISTENER_SUFFIX = len("/pymp-12345678/listener-12345678")


def socket_safe_multiprocessing_tempdir() -> None:
    """Give multiprocessing a temporary folder whose socket paths can be bound, when ``TMPDIR`` is too long.

    A DataLoader worker hands each batch to the main process through a file descriptor sent over a Unix socket
    that multiprocessing creates in its temporary folder (``$TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX``). With a
    ``TMPDIR`` over about 75 characters the bind fails inside the worker, the batch is lost, and the loader
    waits forever. Then the folder is made under the first short, writable system temporary folder instead (as
    CPython 3.13 does itself); the workers, forked later, inherit it.
    """
    import multiprocessing
    import shutil
    import tempfile
    from multiprocessing import util

    config = multiprocessing.current_process()._config  # where multiprocessing.util.get_temp_dir keeps it
    if config.get("tempdir") is not None or len(os.fsencode(tempfile.gettempdir())) + _LISTENER_SUFFIX <= _SUN_PATH_MAX:
        return
    for base in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            folder = tempfile.mkdtemp(prefix="pymp-", dir=base)
            util.Finalize(None, shutil.rmtree, args=(folder, True), exitpriority=-100)
            config["tempdir"] = folder
            log.info("TMPDIR is too long for the data workers' sockets; multiprocessing uses %s", folder)
            return
