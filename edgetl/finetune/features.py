"""The linear probe's feature cache: run the frozen backbone once, then train the head on its output.

With the backbone frozen, locked in eval mode and no augmentation, the backbone is a fixed function
of each image, so its output (the input of the head) can be computed once. Every epoch then costs
only the head: a matrix multiply per batch instead of a full forward pass.

The features come from the model with its head swapped for ``nn.Identity`` (so any op between the
backbone and the head, such as a dropout layer in the head's parent, runs as in eval mode and is
included). That is only equivalent when the head's output *is* the model's output;
:func:`head_is_output` checks this (it is false for SqueezeNet, whose 1x1-conv head is followed by
a ReLU and a pooling layer), and the trainer falls back to full forward passes otherwise.

Features are kept in memory up to ``max_memory_mb``; larger caches are written to a ``.npy`` file
(written atomically, then memory-mapped) in the run's cache folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl._io import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgetl.finetune.distributed import DistInfo

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_MB = 2048


@contextlib.contextmanager
def head_removed(model: nn.Module, head_path: str) -> Iterator[nn.Module]:
    """Temporarily replace the head with ``nn.Identity``; yield the model, restore the head after."""
    from torch import nn  # deferred: heavy

    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        yield model
    finally:
        setattr(parent, attr, head)


def head_is_output(model: nn.Module, head_path: str, example: torch.Tensor) -> bool:
    """Whether the head's output is the model's output (so the head's input can be cached)."""
    import torch  # deferred: heavy

    head = model.get_submodule(head_path)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(example)
    finally:
        handle.remove()
        model.train(was_training)
    return bool(seen) and isinstance(out, torch.Tensor) and out.shape == seen[-1].shape and torch.equal(out, seen[-1])


class FeatureCache:
    """Cached head inputs and labels of one split.

    Attributes:
        features: ``N x D`` float32 features (a tensor, or a memory-mapped array for disk caches).
        labels: ``N`` int64 labels.
        path: the ``.npy`` file of a disk cache, else None.
    """

    def __init__(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor, path: Path | None = None):
        self.features = features
        self.labels = labels
        self.path = path

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The features at ``index`` as a float32 tensor."""
        import torch  # deferred: heavy

        if isinstance(self.features, torch.Tensor):
            return self.features[index]
        idx = index.numpy()
        order = np.argsort(idx, kind="stable")
        block = np.asarray(self.features[idx[order]])  # sorted reads are sequential on disk
        out = np.empty_like(block)
        out[order] = block
        return torch.from_numpy(out)


def extract_features(
    model: nn.Module,
    head_path: str,
    loader: Any,
    device: Any = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    disk_dir: str | os.PathLike[str] | None = None,
    name: str = "features",
    dist: DistInfo | None = None,
    progress: Any = None,
) -> FeatureCache:
    """Run the frozen backbone over ``loader`` once and cache the head's inputs.

    Args:
        model: the model with its (new) head; it is run in eval mode with the head removed.
        head_path: the head's module path.
        loader: batches of ``(images, labels)`` in a fixed order, with the evaluation transform.
        device: where to run the backbone.
        amp_dtype: autocast dtype on CUDA (features are stored as float32).
        channels_last: feed images in channels-last memory format.
        max_memory_mb: keep up to this many MB in memory; past it write a ``.npy`` file.
        disk_dir: where to write the ``.npy`` file (required for caches past the limit).
        name: file stem of the ``.npy`` file.
        dist: when distributed, each rank extracts its shard (the loader's sampler must be a
            :class:`~edgetl.finetune.distributed.ShardSampler`) and the shards are gathered so every
            rank holds the whole cache.
        progress: an optional callable ``progress(images_done)``.
    """
    import torch  # deferred: heavy

    was_training = model.training
    model.eval()
    labels: list[torch.Tensor] = []
    total = len(loader.dataset) if dist is None or not dist.enabled else len(loader.sampler)
    try:
        with head_removed(model, head_path), torch.inference_mode(), contextlib.ExitStack() as stack:
            sink = _FeatureSink(total, max_memory_mb, disk_dir, name, stack)
            for images, target in loader:
                feats = _batch_features(model, images, device, amp_dtype, channels_last)
                labels.append(target.cpu())
                sink.add(feats)
                if progress is not None:
                    progress(sink.written)
            sink.close()
    finally:
        model.train(was_training)
    label_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return _cache(sink, label_t, dist, len(loader.dataset), device)


def _batch_features(model: nn.Module, images: torch.Tensor, device: Any, amp_dtype: torch.dtype | None,
                    channels_last: bool) -> torch.Tensor:
    """The flattened float32 features of one batch, on the CPU."""
    import torch  # deferred: heavy

    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        feats = model(images)
    return feats.float().flatten(1).cpu()


class _FeatureSink:
    """Collects feature batches in memory, or in a memory-mapped ``.npy`` file once they would pass the limit.

    The file is written through :func:`~edgetl._io.atomic_path` entered on ``stack``; :meth:`close` must
    run before the stack closes, so the file is flushed before it is moved into place.
    """

    def __init__(self, total: int, max_memory_mb: float, disk_dir: str | os.PathLike[str] | None, name: str,
                 stack: contextlib.ExitStack) -> None:
        self.total, self.max_memory_mb, self.stack = total, max_memory_mb, stack
        self.path = Path(disk_dir) / f"{name}.npy" if disk_dir else None
        self.chunks: list[torch.Tensor] = []
        self.memmap: np.ndarray | None = None
        self.written = 0

    def add(self, feats: torch.Tensor) -> None:
        megabytes = feats.shape[1] * 4 * self.total / 2**20
        if self.memmap is None and not self.chunks and megabytes > self.max_memory_mb and self.path is not None:
            tmp = self.stack.enter_context(atomic_path(self.path))
            self.memmap = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                    shape=(self.total, feats.shape[1]))
            log.info("feature cache of %.0f MB goes to %s", megabytes, self.path)
        if self.memmap is not None:
            self.memmap[self.written : self.written + feats.shape[0]] = feats.numpy()
        else:
            self.chunks.append(feats)
        self.written += feats.shape[0]

    def close(self) -> None:
        if self.memmap is not None:
            self.memmap.flush()
            self.memmap = None  # unmapped: the file can be moved into place


def _cache(sink: _FeatureSink, labels: torch.Tensor, dist: DistInfo | None, size: int, device: Any) -> FeatureCache:
    """The cache of what ``sink`` collected: in memory (gathered across ranks when distributed) or on disk."""
    import torch  # deferred: heavy

    distributed = dist is not None and dist.enabled
    if sink.chunks or sink.written == 0:
        feats = torch.cat(sink.chunks) if sink.chunks else torch.empty(0, 0)
        if distributed:
            feats, labels = _gather_shards(dist, feats, labels, size, device)
        return FeatureCache(feats, labels)
    if distributed:
        raise RuntimeError("distributed feature caches must fit in memory; raise max_memory_mb")
    # Unreadable images are dropped from their batch, so fewer rows than planned may have been written.
    return FeatureCache(np.load(sink.path, mmap_mode="r")[: sink.written], labels, sink.path)


def _gather_shards(dist: DistInfo, feats: torch.Tensor, labels: torch.Tensor, size: int, device: Any):
    """Reassemble per-rank shards (rank r holds indices r, r+W, ...) into the full cache on every rank."""
    import torch  # deferred: heavy
    import torch.distributed as tdist  # deferred: heavy

    per_rank = -(-size // dist.world_size)
    comm_device = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    padded_f = torch.zeros(per_rank, feats.shape[1], device=comm_device)
    padded_l = torch.zeros(per_rank, dtype=torch.long, device=comm_device)
    padded_f[: feats.shape[0]] = feats.to(comm_device)
    padded_l[: labels.shape[0]] = labels.to(comm_device)
    all_f = [torch.empty_like(padded_f) for _ in range(dist.world_size)]
    all_l = [torch.empty_like(padded_l) for _ in range(dist.world_size)]
    tdist.all_gather(all_f, padded_f)
    tdist.all_gather(all_l, padded_l)
    out_f = torch.empty(size, feats.shape[1])
    out_l = torch.empty(size, dtype=torch.long)
    for r in range(dist.world_size):
        idx = torch.arange(r, size, dist.world_size)
        out_f[idx] = all_f[r][: idx.numel()].cpu()
        out_l[idx] = all_l[r][: idx.numel()].cpu()
    return out_f, out_l


class FeatureBatches:
    """Mini-batches over a :class:`FeatureCache`, shuffled per epoch by a seeded sampler.

    It quacks like a DataLoader for the trainer: iterate for ``(features, labels)`` batches, ``len``
    for the number of batches, ``sampler.set_epoch`` for the epoch's order.
    """

    def __init__(self, cache: FeatureCache, batch_size: int, sampler: Any = None, drop_last: bool = False):
        self.cache = cache
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        self.dataset = cache  # len(loader.dataset) is the number of samples

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.cache)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch  # deferred: heavy

        order = (
            torch.as_tensor(list(self.sampler), dtype=torch.long)
            if self.sampler is not None
            else torch.arange(len(self.cache))
        )
        for start in range(0, order.numel(), self.batch_size):
            index = order[start : start + self.batch_size]
            if self.drop_last and index.numel() < self.batch_size:
                break
            yield self.cache.rows(index), self.cache.labels[index]
