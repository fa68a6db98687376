"""Randomised training labels (`dataset.label_noise`): a fixed fraction of the examples gets a uniformly random label.

    label'_i = y_i                     for i outside the chosen set
    label'_i = c_i ~ Uniform{0..K-1}   for round(fraction * N) indices chosen uniformly without replacement

Both the chosen indices and the new labels are drawn once from a generator seeded by the run's seed, so the noise
is fixed for the whole run (every epoch sees the same labels) and identical across runs with the same seed. A
random label equals the true one with probability 1 / K, so about fraction * (1 - 1/K) of the labels are wrong.
With randomised labels the training loss cannot reach zero: gradients stay noise-dominated, the regime the
equilibrium theory of adaptive optimizers is about (docs/theory.md section 6.3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["NoisyLabels"]

_STREAM = 0x1AB31
"""Offsets the label draws from the other seeded streams of the run (model init, data order, augmentation)."""


class NoisyLabels(Dataset[tuple[Tensor, int]]):
    """`base` with round(fraction * len(base)) labels replaced by uniform random ones (see the module docstring)."""

    def __init__(self, base: Dataset[tuple[Tensor, int]], fraction: float, num_classes: int, seed: int = 0):
        self.base = base
        n = len(base)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + _STREAM) & 0x7FFFFFFFFFFFFFFF)
        chosen = torch.randperm(n, generator=gen)[: round(fraction * n)]
        labels = torch.randint(0, num_classes, (len(chosen),), generator=gen)
        self.replaced: dict[int, int] = dict(zip(chosen.tolist(), labels.tolist(), strict=True))
        """Index -> its random label."""

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        return x, self.replaced.get(int(i), int(y))

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped dataset (augmentation draws); the labels do not change with the epoch."""
        inner: Any = getattr(self.base, "set_epoch", None)
        if callable(inner):
            inner(epoch)
