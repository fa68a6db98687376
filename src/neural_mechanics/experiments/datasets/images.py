"""Image datasets: the paper's per-channel normalisation, its crop + flip augmentation, tensor-backed datasets,
and the error text that describes what an on-disk layout should look like next to what was found.

Image datasets are normalised with the per-channel statistics of the paper's code
(danielkunin/neural-mechanics utils/load.py) and optionally augmented as there: random crop of the
zero-padded image (padding 4) and horizontal flip, on by default for the training split. Augmentation
draws its randomness from a generator seeded by (seed, epoch, index), not from the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.experiments.datasets.loaders import mix_seed

#: Per-channel (mean, std) used by the paper's code for normalisation.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "tinyimagenet": ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282)),
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}


def crop_flip(image: Tensor, padding: int, generator: torch.Generator, flip: bool = True) -> Tensor:
    """Random crop of the zero-padded image back to its size, then a horizontal flip with probability 1/2.

    out = flip?(pad(image, padding)[:, i:i+H, j:j+W]) with i, j uniform in {0, ..., 2*padding}.
    """
    _, h, w = image.shape
    if padding > 0:
        padded = torch.nn.functional.pad(image, (padding, padding, padding, padding))
        i, j = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,), generator=generator))
        image = padded[:, i : i + h, j : j + w]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image


class NormalizedImages(Dataset[tuple[Tensor, int]]):
    """Wraps a dataset of ([0, 1] float CHW image, label): optional crop/flip augmentation, then (x - mean) / std.

    Augmentation randomness comes from a generator seeded by (seed, epoch, index); `set_epoch` moves to another
    epoch's draws (the loader from `make_loader` calls it).
    """

    def __init__(
        self,
        base: Dataset[tuple[Tensor, int]],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        padding: int = 4,
        seed: int = 0,
    ):
        self.base = base
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.padding = padding
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        if self.augment:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index))
            image = crop_flip(image, self.padding, gen)
        return (image - self.mean) / self.std, label


class TensorClassification(Dataset[tuple[Tensor, int]]):
    """Examples x[i] (a float tensor) with labels y[i]."""

    def __init__(self, x: Tensor, y: Tensor):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.x[index], int(self.y[index])


class UInt8Images(Dataset[tuple[Tensor, int]]):
    """uint8 images stored N x H x W x C (CIFAR's layout), returned as float C x H x W in [0, 1]."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].permute(2, 0, 1).float().div(255.0), self.labels[index]


# -- describing on-disk layouts in errors ------------------------------------------------------


def describe_dir(path: Path, limit: int = 12) -> str:
    """What `path` holds, for an error message: missing, a file, empty, or its first `limit` entries."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return f"{path} is empty"
    more = f" ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return f"{path} contains: {', '.join(entries[:limit])}{more}"


def indent(text: str) -> str:
    """`text` with every line indented by four spaces."""
    return "\n".join("    " + line for line in text.splitlines())

