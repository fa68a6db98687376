"""The "synthetic" dataset: seeded class-dependent Gaussian patterns of any shape and class count, generated per
index on the fly, for tests and benchmarks (no files, no download).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.loaders import mix_seed
from neural_mechanics.experiments.datasets.registry import (
    SPLITS,
    DataOptions,
    DatasetInfo,
)


class SyntheticImages(Dataset[tuple[Tensor, int]]):
    """Seeded class-dependent Gaussian patterns: x_i = signal * mu_{y_i} + noise * eps_i, y_i = perm(i) mod K.

    The class prototypes mu_k ~ N(0, I) depend only on `seed`; eps_i ~ N(0, I) and the labels depend on
    (seed, split, i), so train and test are different draws from the same distribution.
    """

    def __init__(
        self,
        num_samples: int,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        seed: int = 0,
        split: str = "train",
        signal: float = 1.0,
        noise: float = 1.0,
    ):
        if num_samples < 1 or num_classes < 1 or not input_shape or any(s < 1 for s in input_shape):
            raise DatasetError(
                f"synthetic dataset needs positive sizes, got num_samples={num_samples}, "
                f"input_shape={tuple(input_shape)}, num_classes={num_classes}",
                "pass e.g. num_samples=512, input_shape=(3, 32, 32), num_classes=10",
            )
        self.num_samples = num_samples
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        self.seed = seed
        self.split_id = SPLITS.index(split)
        self.signal = signal
        self.noise = noise
        proto_gen = torch.Generator().manual_seed(mix_seed(seed, 1_000_003))
        self.prototypes = torch.randn((num_classes, *self.input_shape), generator=proto_gen)
        label_gen = torch.Generator().manual_seed(mix_seed(seed, 2_000_003, self.split_id))
        self.labels = (torch.randperm(num_samples, generator=label_gen) % num_classes).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        label = int(self.labels[index])
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 3_000_017, self.split_id, index))
        eps = torch.randn(self.input_shape, generator=gen)
        return self.signal * self.prototypes[label] + self.noise * eps, label


def build_synthetic(split: str, options: DataOptions) -> DatasetInfo:
    """`options.num_samples` examples (default 512 for train, 128 otherwise) of shape `options.input_shape` in
    `options.num_classes` classes."""
    n = options.num_samples if options.num_samples is not None else (512 if split == "train" else 128)
    ds = SyntheticImages(n, options.input_shape, options.num_classes, seed=options.seed, split=split)
    return DatasetInfo(ds, options.num_classes, ds.input_shape, "synthetic", split,
                       tuple(str(k) for k in range(options.num_classes)))
