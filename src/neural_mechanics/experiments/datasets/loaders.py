"""Deterministic data loading: a loader whose epoch e is a pure function of (seed, e), and the seed mixing
that every per-example random stream (augmentation, synthetic samples) derives from.

`make_loader` shuffles with a permutation seeded by (seed, epoch) (DistributedSampler's rule, so under DDP each
rank reads a disjoint shard), seeds its workers from a generator reset per epoch, and tells the dataset the
epoch (`set_epoch`) so augmentation draws depend on (seed, epoch, index) only: an epoch's batches are the same
whatever the number of workers, and a resumed run replays any epoch with `loader.set_epoch(epoch)`.
`endless_batches` is the training loop's view: micro-batches across epochs, from any position.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.registry import DatasetInfo


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing), so (seed, epoch, index) streams do not collide."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed Python's and NumPy's RNGs from the worker's torch seed (which the loader's generator
    fixes), so any third-party randomness in a worker is reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SeededLoader(DataLoader[Any]):
    """A DataLoader whose epoch e is a pure function of (seed, e): each `iter()` uses the sampler's permutation for
    the current epoch and the dataset's augmentation draws for it, then advances the epoch. `set_epoch(e)` jumps to
    epoch e (for resuming)."""

    epoch: int
    seed: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = getattr(self, "epoch", 0)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if self.generator is not None:  # worker seeds, too, depend only on (seed, epoch)
            self.generator.manual_seed(mix_seed(getattr(self, "seed", 0), epoch))
        self.epoch = epoch + 1
        return super().__iter__()


def make_loader(
    data: DatasetInfo | Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> SeededLoader:
    """A deterministic loader: order = permutation seeded by (seed, epoch) (DistributedSampler's rule, so under DDP
    pass num_replicas=world size and rank to get disjoint shards), worker RNGs fixed by a seeded generator and
    `seed_worker`. Iterating twice gives epochs 0 and 1; `loader.set_epoch(e)` replays epoch e."""
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch size")
    dataset = data.dataset if isinstance(data, DatasetInfo) else data
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    gen = torch.Generator().manual_seed(seed)
    loader = SeededLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=gen,
    )
    loader.epoch = 0
    loader.seed = seed
    return loader


def endless_batches(loader: Any, start_micro: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches, starting at micro-batch `start_micro` of the deterministic epoch sequence."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0
