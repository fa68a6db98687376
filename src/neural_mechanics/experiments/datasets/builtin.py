"""The built-in datasets, registered in one table (the order `dataset_names()` and error messages list them in)."""

from __future__ import annotations

from functools import partial

from neural_mechanics.experiments.datasets.cifar import build_cifar
from neural_mechanics.experiments.datasets.digits import build_digits
from neural_mechanics.experiments.datasets.registry import DatasetSpec, accept_any_keys, register_dataset
from neural_mechanics.experiments.datasets.synthetic import build_synthetic
from neural_mechanics.experiments.datasets.tinyimagenet import build_tinyimagenet

BUILTIN_DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("digits", build_digits, "scikit-learn's 8x8 handwritten digits, 10 classes (no download)",
                validate=accept_any_keys),
    DatasetSpec("tinyimagenet", build_tinyimagenet,
                "Tiny ImageNet (200 classes, 64x64) from a local tiny-imagenet-200 directory",
                aliases=("tiny-imagenet", "tiny_imagenet", "tiny-imagenet-200"), keys=("root", "augment")),
    DatasetSpec("cifar10", partial(build_cifar, "cifar10"),
                "CIFAR-10 (10 classes, 32x32) from a local cifar-10-batches-py directory", keys=("root", "augment")),
    DatasetSpec("cifar100", partial(build_cifar, "cifar100"),
                "CIFAR-100 (100 classes, 32x32) from a local cifar-100-python directory", keys=("root", "augment")),
    DatasetSpec("synthetic", build_synthetic,
                "seeded Gaussian class patterns (3x32x32, 10 classes from a config; no files)",
                validate=accept_any_keys),
)

for _spec in BUILTIN_DATASETS:
    register_dataset(_spec)
