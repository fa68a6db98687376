"""Datasets for the experiments: a registry of dataset specs, the built-in datasets, and a data loader that is a
pure function of (seed, epoch).

Built in (all returning `(float tensor of shape input_shape, int label)`):

- "digits" (the default): scikit-learn's 8x8 handwritten digits, no download (`datasets/digits.py`);
- "tinyimagenet": a local `tiny-imagenet-200` directory (`datasets/tinyimagenet.py`);
- "cifar10" / "cifar100": a local directory in torchvision's format (`datasets/cifar.py`);
- "synthetic": seeded class-dependent Gaussian patterns of any shape and class count (`datasets/synthetic.py`).

`load_dataset(name, root, split=...)` loads a split of any registered dataset; `register_dataset(DatasetSpec(...))`
adds one (see `datasets/registry.py`; the built-ins are the table in `datasets/builtin.py`); `make_loader` is the
deterministic loader (`datasets/loaders.py`). Data that needs a download cannot be fetched here: a missing or
malformed directory raises DatasetError saying what layout was expected, what was found, and how to get it.
"""

from neural_mechanics.experiments.datasets.builtin import BUILTIN_DATASETS  # registers the built-in datasets
from neural_mechanics.experiments.datasets.cifar import build_cifar
from neural_mechanics.experiments.datasets.digits import build_digits
from neural_mechanics.experiments.datasets.images import (
    NORMALIZATION,
    NormalizedImages,
    TensorClassification,
    UInt8Images,
    crop_flip,
)
from neural_mechanics.experiments.datasets.loaders import (
    SeededLoader,
    endless_batches,
    make_loader,
    mix_seed,
    seed_worker,
)
from neural_mechanics.experiments.datasets.registry import (
    DATASETS,
    SPLITS,
    DataOptions,
    DatasetConfig,
    DatasetInfo,
    DatasetSpec,
    Split,
    dataset_from_config,
    dataset_names,
    default_root,
    get_dataset,
    load_dataset,
    register_dataset,
    validate_dataset_config,
)
from neural_mechanics.experiments.datasets.synthetic import SyntheticImages, build_synthetic
from neural_mechanics.experiments.datasets.tinyimagenet import (
    TINYIMAGENET_LAYOUT,
    TINYIMAGENET_URL,
    TinyImageNet,
    build_tinyimagenet,
    find_tinyimagenet_dir,
)

#: The names of the built-in datasets (`dataset_names()` also lists those registered later).
DATASET_NAMES: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_DATASETS)

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "DATASET_NAMES",
    "NORMALIZATION",
    "SPLITS",
    "TINYIMAGENET_LAYOUT",
    "TINYIMAGENET_URL",
    "DataOptions",
    "DatasetConfig",
    "DatasetInfo",
    "DatasetSpec",
    "NormalizedImages",
    "SeededLoader",
    "Split",
    "SyntheticImages",
    "TensorClassification",
    "TinyImageNet",
    "UInt8Images",
    "build_cifar",
    "build_digits",
    "build_synthetic",
    "build_tinyimagenet",
    "crop_flip",
    "dataset_from_config",
    "dataset_names",
    "default_root",
    "endless_batches",
    "find_tinyimagenet_dir",
    "get_dataset",
    "load_dataset",
    "make_loader",
    "mix_seed",
    "register_dataset",
    "seed_worker",
    "validate_dataset_config",
]
