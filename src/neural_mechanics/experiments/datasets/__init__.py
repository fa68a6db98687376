"""Datasets for the experiments: a registry of dataset specs, the built-in datasets, and a data loader that is a
pure function of (seed, epoch).

Built in (all returning `(input tensor of shape input_shape, target)` pairs):

- "digits" (the default): scikit-learn's 8x8 handwritten digits, no download (`datasets/digits.py`);
- "tinyimagenet": a local `tiny-imagenet-200` directory (`datasets/tinyimagenet.py`);
- "cifar10" / "cifar100": a local directory in torchvision's format (`datasets/cifar.py`);
- "synthetic": seeded data of any input shape, dtype and class count, with class, per-pixel, regression or
  next-token targets (`datasets/synthetic.py`);
- "imagefolder": your images, one folder per class (`datasets/imagefolder.py`);
- "tokens": token sequences with next-token targets from a text or token file, or the embedded corpus
  (`datasets/tokens.py`).

A name `package.module:factory` is your own code returning a torch Dataset (`datasets/factory.py`).

`load_dataset(name, root, split=...)` loads a split of any registered dataset; `register_dataset(DatasetSpec(...))`
adds one (see `datasets/registry.py`; the built-ins are the table in `datasets/builtin.py`); `make_loader` is the
deterministic loader (`datasets/loaders.py`). Data that needs a download cannot be fetched here: a missing or
malformed directory raises DatasetError saying what layout was expected, what was found, and how to get it.
"""

from neural_mechanics.experiments.datasets.builtin import BUILTIN_DATASETS  # registers the built-in datasets
from neural_mechanics.experiments.datasets.cifar import build_cifar
from neural_mechanics.experiments.datasets.digits import build_digits
from neural_mechanics.experiments.datasets.factory import build_factory
from neural_mechanics.experiments.datasets.imagefolder import IMAGEFOLDER_LAYOUT, build_imagefolder
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
    register_dataset_resolver,
    validate_dataset_config,
)
from neural_mechanics.experiments.datasets.synthetic import (
    SyntheticImages,
    SyntheticMarkovTokens,
    SyntheticRegression,
    SyntheticSegmentation,
    SyntheticTokenClasses,
    build_synthetic,
)
from neural_mechanics.experiments.datasets.tinyimagenet import (
    TINYIMAGENET_LAYOUT,
    TINYIMAGENET_URL,
    TinyImageNet,
    build_tinyimagenet,
    find_tinyimagenet_dir,
)
from neural_mechanics.experiments.datasets.tokens import TokenWindows, build_tokens, embedded_corpus, read_tokens

#: The names of the built-in datasets (`dataset_names()` also lists those registered later).
DATASET_NAMES: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_DATASETS)

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "DATASET_NAMES",
    "IMAGEFOLDER_LAYOUT",
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
    "SyntheticMarkovTokens",
    "SyntheticRegression",
    "SyntheticSegmentation",
    "SyntheticTokenClasses",
    "TensorClassification",
    "TinyImageNet",
    "TokenWindows",
    "UInt8Images",
    "build_cifar",
    "build_digits",
    "build_factory",
    "build_imagefolder",
    "build_synthetic",
    "build_tinyimagenet",
    "build_tokens",
    "crop_flip",
    "dataset_from_config",
    "dataset_names",
    "default_root",
    "embedded_corpus",
    "endless_batches",
    "find_tinyimagenet_dir",
    "get_dataset",
    "load_dataset",
    "make_loader",
    "mix_seed",
    "read_tokens",
    "register_dataset",
    "register_dataset_resolver",
    "seed_worker",
    "validate_dataset_config",
]
