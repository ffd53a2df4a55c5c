"""DistributedDataParallel plumbing for ``torchrun``: process group, ranks, samplers, reductions.

Under ``torchrun --nproc_per_node N -m edgetl finetune ...`` each process sees ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``. edgetl joins the process group (NCCL on GPU, gloo on CPU), shards
the training set with a :class:`~torch.utils.data.DistributedSampler`, reduces metrics across ranks,
and lets only rank 0 write files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device_type: str) -> DistInfo:
    """Join torchrun's process group if there is one (NCCL for CUDA, gloo otherwise)."""
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            import torch

            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(rank, world, local_rank)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it."""
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """The minimum of ``tensor`` over all ranks, in place; return it."""
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_flag(info: DistInfo, flag: bool, device: Any) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. an interruption)."""
    if not info.enabled:
        return flag
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_sum(info, t)
    return bool(t.item() > 0)


def broadcast_mask(info: DistInfo, mask: list[bool], device: Any) -> list[bool]:
    """Rank 0's ``mask`` on every rank (e.g. a choice each rank timed for itself, which must agree)."""
    if not info.enabled or not mask:
        return mask
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if m else 0.0 for m in mask], device=device)
    dist.broadcast(t, src=0)
    return [bool(v > 0) for v in t.tolist()]


class EpochSampler:
    """A seeded sampler whose order depends only on ``(seed, epoch)``, so a resumed run sees the same data.

    With ``weights`` it draws ``len(weights)`` indices with replacement in proportion to them (class
    balancing); otherwise it shuffles. With ``num_replicas > 1`` each rank takes every
    ``num_replicas``-th index of the epoch's order, padded so every rank gets the same count.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        weights: list[float] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.size = size
        self.seed = seed
        self.weights = weights
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = -(-size // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            w = torch.as_tensor(self.weights, dtype=torch.double)
            return torch.multinomial(w, self.size, replacement=True, generator=g).tolist()
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        total = self.num_samples * self.num_replicas
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler:
    """Every ``num_replicas``-th index in order, without padding: exact distributed evaluation."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
