"""The dataset registry: one `DatasetSpec` per dataset, looked up by name, and `load_dataset`.

A spec says how to build one split (`build(split, options) -> DatasetInfo`), which keys of the config's
`dataset` section it reads, and how that section is validated. `load_dataset(name, ...)` and the training loop
(`dataset_from_config`) both go through the registry, so a registered dataset is usable everywhere at once:

    register_dataset(DatasetSpec("mydata", build=my_builder, description="...", keys=("root",)))

makes `dataset: {name: mydata, root: /data/x}` a valid config. `DataOptions` carries what a builder may read
(the resolved root, whether to augment, the seed, and the knobs of the built-in datasets); a new kind of
dataset that needs a new config key adds the field to `DatasetConfig` (with a default that changes nothing
for the others) and to `DataOptions`, passes it on in `dataset_from_config` (and `load_dataset`), and lists
it in its spec's `keys`. A spec without its own `validate` refuses every key it does not read that is set
away from its default. `get_dataset` is the one lookup every path takes (config validation, `load_dataset`),
so datasets named by a pattern rather than a fixed name (say `package.module:factory`) are resolved there.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import ConfigError, DatasetError
from neural_mechanics.experiments.datasets.label_noise import NoisyLabels
from neural_mechanics.experiments.schema import changed_fields

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Keys of the dataset section that every dataset honours (the loader reads them, not the builder; `label_noise` is
#: applied by `load_dataset` to the train split of any dataset).
COMMON_KEYS: tuple[str, ...] = ("name", "eval_split", "num_workers", "label_noise")


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """A loaded split: the torch Dataset, its class count, one example's shape, and the dataset's name."""

    dataset: Dataset[tuple[Tensor, int]]
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    split: str = "train"
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DatasetConfig:
    """The `dataset` section of a training config: `name` is a registered dataset (or an alias, any case);
    `root` defaults to $NMECH_DATA or ./data."""

    name: str = "digits"
    root: str | None = None
    augment: bool | None = None  # None: the dataset's default (crop + flip on the train split of image datasets)
    eval_split: Literal["val", "test"] = "test"
    num_workers: int = 0
    label_noise: float = 0.0  # fraction of training labels replaced by uniform random ones, fixed by the seed

    def __post_init__(self) -> None:
        try:
            get_dataset(self.name)
        except DatasetError as exc:  # in a config it is the config that is wrong
            raise ConfigError(f"dataset.name: {exc.what}", exc.fix) from None


@dataclass(frozen=True)
class DataOptions:
    """What a builder may read besides the split: where the data is, whether to augment it, the seed, and the
    knobs of the built-in datasets (digits: test_fraction; cifar: verify_checksums; synthetic: num_samples
    (None: 512 for train, 128 otherwise), input_shape, num_classes)."""

    root: Path
    augment: bool
    seed: int = 0
    verify_checksums: bool = False
    test_fraction: float = 0.2
    num_samples: int | None = None
    input_shape: tuple[int, ...] = (3, 32, 32)
    num_classes: int = 10


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: `build(split, options)` loads split "train", "val" or "test".

    keys: the DatasetConfig keys the builder reads (besides COMMON_KEYS). validate(cfg) raises ConfigError for a
    dataset section this dataset cannot honour; None means `refuse_unused_keys`.
    """

    name: str
    build: Callable[[str, DataOptions], DatasetInfo]
    description: str
    aliases: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    validate: Callable[[DatasetConfig], None] | None = None

    def check(self, cfg: DatasetConfig) -> None:
        """Run `validate`, or (without one) `refuse_unused_keys`."""
        if self.validate is not None:
            self.validate(cfg)
        else:
            self.refuse_unused_keys(cfg)

    def refuse_unused_keys(self, cfg: DatasetConfig) -> None:
        """ConfigError when a key outside `keys` and COMMON_KEYS is set away from its default: it would be ignored."""
        unused = changed_fields(cfg, (*COMMON_KEYS, *self.keys))
        if unused:
            raise ConfigError(f"dataset.{unused[0]}: {self.name} does not read {', '.join(unused)}",
                              f"remove {', '.join('dataset.' + k for k in unused)}"
                              + (f"; {self.name} reads {', '.join(self.keys)}" if self.keys else ""))


def accept_any_keys(cfg: DatasetConfig) -> None:
    """The validator of the built-in datasets that read no directory (digits, synthetic): they have always ignored
    `root` and `augment`, and configs that set them keep loading."""


#: The registry (canonical name -> spec), in registration order; aliases map lower-case names to canonical ones.
DATASETS: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add `spec` (and its aliases) to the registry; ValueError if a name is taken, unless replace=True."""
    if spec.name != spec.name.lower():
        raise ValueError(f"dataset names are lower case (lookups ignore case), got {spec.name!r}")
    clash = [n for n in (spec.name, *(a.lower() for a in spec.aliases)) if n in DATASETS or n in _ALIASES]
    if clash and not replace:
        raise ValueError(f"dataset name(s) {clash} already registered (pass replace=True)")
    unknown = [k for k in spec.keys if k not in DatasetConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"dataset spec {spec.name!r} reads keys DatasetConfig does not have: {unknown}")
    DATASETS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias.lower()] = spec.name
    return spec


def _canonical(name: str) -> str:
    key = name.lower()
    return _ALIASES.get(key, key)


def dataset_names() -> tuple[str, ...]:
    """The registered dataset names (without aliases), in registration order."""
    return tuple(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The spec for `name` (any case, aliases allowed); DatasetError with close matches if there is none."""
    spec = DATASETS.get(_canonical(name))
    if spec is None:
        close = difflib.get_close_matches(_canonical(name), dataset_names(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DatasetError(f"unknown dataset {name!r}", f"{hint}datasets: {', '.join(dataset_names())}")
    return spec


def validate_dataset_config(cfg: DatasetConfig) -> None:
    """The value checks of the dataset section: the loader's own, then the dataset spec's."""
    if cfg.num_workers < 0:
        raise ConfigError("dataset.num_workers: must be >= 0", "use 0 to load in the main process")
    if not 0 <= cfg.label_noise < 1:
        raise ConfigError(f"dataset.label_noise: must be in [0, 1), got {cfg.label_noise}",
                          "give the fraction of training labels to randomise, e.g. 0.3 (0 = clean labels)")
    get_dataset(cfg.name).check(cfg)


def default_root() -> Path:
    """Where datasets live unless `root` is given: $NMECH_DATA, else ./data."""
    return Path(os.environ.get("NMECH_DATA", "data"))


def load_dataset(
    name: str = "digits",
    root: str | os.PathLike[str] | None = None,
    *,
    split: Split = "train",
    augment: bool | None = None,
    seed: int = 0,
    verify_checksums: bool = False,
    test_fraction: float = 0.2,
    num_samples: int | None = None,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    label_noise: float = 0.0,
) -> DatasetInfo:
    """Load split `split` of dataset `name` (a registered name such as "digits", "tinyimagenet", "cifar10",
    "cifar100", "synthetic"; `dataset_names()` lists them).

    root: the data directory (default $NMECH_DATA or ./data); not used by digits and synthetic.
    augment: random crop (zero padding 4) + horizontal flip for image datasets; default on for split="train".
    seed: augmentation seed, digits' train/test split, synthetic data. "val" and "test" are the same held-out split
    for datasets that have only one (CIFAR's test batch, digits' test part, Tiny ImageNet's labelled val).
    test_fraction: digits only. num_samples (default 512 train / 128 otherwise), input_shape, num_classes: synthetic.
    label_noise: the fraction of the train split's labels replaced by uniform random ones, drawn once from `seed`
    (`datasets/label_noise.py`; other splits are never changed).
    """
    spec = get_dataset(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {spec.name}", f"use one of {', '.join(SPLITS)}")
    options = DataOptions(
        root=Path(root) if root is not None else default_root(),
        augment=(split == "train") if augment is None else bool(augment),
        seed=seed,
        verify_checksums=verify_checksums,
        test_fraction=test_fraction,
        num_samples=num_samples,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
    )
    info = spec.build(split, options)
    if label_noise and split == "train":
        noisy = NoisyLabels(info.dataset, label_noise, info.num_classes, seed)
        info = DatasetInfo(noisy, info.num_classes, info.input_shape, info.name, info.split, info.classes)
    return info


def dataset_from_config(cfg: DatasetConfig, split: Split, *, seed: int) -> DatasetInfo:
    """Split `split` of the dataset a config section names, seeded by the run's seed (`cfg.augment` applies to the
    train split; held-out splits take the default, i.e. no augmentation)."""
    return load_dataset(cfg.name, cfg.root, split=split, augment=cfg.augment if split == "train" else None,
                        seed=seed, label_noise=cfg.label_noise)
