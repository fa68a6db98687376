"""The built-in datasets, registered in one table (the order `dataset_names()` and error messages list them in).

Importing this module also makes `package.module:factory` dataset names resolvable (datasets/factory.py).
"""

from __future__ import annotations

from functools import partial

from neural_mechanics.experiments.datasets import factory as _factory  # noqa: F401  (registers the name resolver)
from neural_mechanics.experiments.datasets.cifar import build_cifar
from neural_mechanics.experiments.datasets.digits import build_digits
from neural_mechanics.experiments.datasets.imagefolder import build_imagefolder
from neural_mechanics.experiments.datasets.registry import DatasetConfig, DatasetSpec, register_dataset
from neural_mechanics.experiments.datasets.synthetic import TARGETS_FOR_DTYPE, build_synthetic
from neural_mechanics.experiments.datasets.tinyimagenet import build_tinyimagenet
from neural_mechanics.experiments.datasets.tokens import build_tokens
from neural_mechanics.experiments.schema import check

#: digits and synthetic read no directory; configs have always been allowed to set root and augment for them.
_NO_DIRECTORY = ("root", "augment")


def _validate_synthetic(cfg: DatasetConfig) -> None:
    """Which targets each input dtype can have and what shape they need, then the default rule for unused keys."""
    allowed = TARGETS_FOR_DTYPE[cfg.dtype]
    check(cfg.targets in allowed, "dataset.targets", f"synthetic {cfg.dtype} inputs cannot have {cfg.targets} "
          "targets", f"use targets {' or '.join(allowed)} (or another dtype)")
    shape = list(cfg.input_shape or ())
    if cfg.targets == "next_token":
        check(cfg.input_shape is not None and len(shape) == 1, "dataset.input_shape",
              f"next_token examples are one sequence of token ids, got {shape or 'the default [3, 32, 32]'}",
              "e.g. input_shape: [32]")
    if cfg.targets == "pixel":
        check(cfg.input_shape is None or len(shape) >= 2, "dataset.input_shape",
              f"pixel targets need (channels, *positions), got {shape}", "e.g. input_shape: [3, 16, 16]")
    SYNTHETIC.refuse_unused_keys(cfg)


SYNTHETIC = DatasetSpec(
    "synthetic", build_synthetic,
    "seeded data of any input_shape, dtype and num_classes: class patterns, per-pixel classes, regression, token "
    "classes or Markov-chain next tokens (no files)",
    keys=("input_shape", "dtype", "num_classes", "num_samples", "targets", "vocab_size"),
    validate=_validate_synthetic, tolerated=_NO_DIRECTORY)

BUILTIN_DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("digits", build_digits, "scikit-learn's 8x8 handwritten digits, 10 classes (no download)",
                keys=("test_fraction",), tolerated=_NO_DIRECTORY),
    DatasetSpec("tinyimagenet", build_tinyimagenet,
                "Tiny ImageNet (200 classes, 64x64) from a local tiny-imagenet-200 directory",
                aliases=("tiny-imagenet", "tiny_imagenet", "tiny-imagenet-200"), keys=("root", "augment")),
    DatasetSpec("cifar10", partial(build_cifar, "cifar10"),
                "CIFAR-10 (10 classes, 32x32) from a local cifar-10-batches-py directory", keys=("root", "augment")),
    DatasetSpec("cifar100", partial(build_cifar, "cifar100"),
                "CIFAR-100 (100 classes, 32x32) from a local cifar-100-python directory", keys=("root", "augment")),
    SYNTHETIC,
    DatasetSpec("imagefolder", build_imagefolder,
                "your images, one folder per class (torchvision's ImageFolder layout; train/ and val/ optional)",
                aliases=("image_folder", "image-folder", "folder"),
                keys=("root", "augment", "test_fraction", "image_size", "channels", "mean", "std")),
    DatasetSpec("tokens", build_tokens,
                "token sequences with next-token targets: a text file (one token per byte), a .pt/.npy tensor of "
                "ids, or the embedded corpus (scikit-learn's dataset descriptions)",
                aliases=("text", "corpus"), keys=("path", "seq_len", "test_fraction", "vocab_size")),
)

for _spec in BUILTIN_DATASETS:
    register_dataset(_spec)
