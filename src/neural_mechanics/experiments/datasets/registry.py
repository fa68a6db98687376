"""The dataset registry: one `DatasetSpec` per dataset, looked up by name, and `load_dataset`.

A spec says how to build one split (`build(split, options) -> DatasetInfo`), which keys of the config's
`dataset` section it reads, and how that section is validated. `load_dataset(name, ...)` and the training loop
(`dataset_from_config`) both go through the registry, so a registered dataset is usable everywhere at once:

    register_dataset(DatasetSpec("mydata", build=my_builder, description="...", keys=("root",)))

makes `dataset: {name: mydata, root: /data/x}` a valid config. `DataOptions` carries what a builder may read
(the resolved root, whether to augment, the seed, and the knobs of the built-in datasets); a new kind of
dataset that needs a new config key adds the field to `DatasetConfig` (with a default that changes nothing
for the others) and to `DataOptions` (same name: `dataset_from_config` passes every shared field on), and lists
it in its spec's `keys`. A spec without its own `validate` refuses every key it does not read that is set
away from its default (except its `tolerated` keys, accepted and ignored for configs that always set them).
`get_dataset` is the one lookup every path takes (config validation, `load_dataset`), so a name of the form
`package.module:factory` (a user's dataset factory, `datasets/factory.py`) is resolved there.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import ConfigError, DatasetError, NMechError
from neural_mechanics.experiments.datasets.label_noise import NoisyLabels
from neural_mechanics.experiments.schema import changed_fields

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
InputDtype = Literal["float32", "float64", "long"]
#: What a synthetic example's target is: its class, a class per spatial position, the next token, real values.
TargetKind = Literal["class", "pixel", "next_token", "regression"]

#: Keys of the dataset section that every dataset honours (the loader reads them, not the builder; `label_noise` is
#: applied by `load_dataset` to the train split of any dataset).
COMMON_KEYS: tuple[str, ...] = ("name", "eval_split", "num_workers", "label_noise")


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """A loaded split: the torch Dataset of (input, target) pairs, its class count (the model's output width: classes,
    vocabulary size or regression outputs; None when unknown), one example's input shape, and the dataset's name.
    `notes` say where the data came from when that is not obvious from the config (recorded in the run's notes)."""

    dataset: Dataset[tuple[Any, Any]]
    num_classes: int | None
    input_shape: tuple[int, ...]
    name: str
    split: str = "train"
    classes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DatasetConfig:
    """The `dataset` section of a training config: `name` is a registered dataset (or an alias, any case) or
    `package.module:factory`; `root` defaults to $NMECH_DATA or ./data. The other keys are read by some datasets
    only (each spec's `keys`; the comments say which), and a dataset refuses those it does not read."""

    name: str = "digits"
    root: str | None = None
    augment: bool | None = None  # None: the dataset's default (crop + flip on the train split of image datasets)
    eval_split: Literal["val", "test"] = "test"
    num_workers: int = 0
    label_noise: float = 0.0  # fraction of training labels replaced by uniform random ones, fixed by the seed
    test_fraction: float = 0.2  # the held-out share where a dataset has no held-out split of its own
    # synthetic
    input_shape: tuple[int, ...] | None = None  # None: (3, 32, 32)
    dtype: InputDtype = "float32"
    num_classes: int | None = None  # None: 10 (classes, or outputs for regression targets)
    num_samples: int | None = None  # None: 512 for train, 128 otherwise
    targets: TargetKind = "class"
    vocab_size: int | None = None  # token inputs (synthetic long, token tensor files)
    # imagefolder
    image_size: tuple[int, ...] | None = None  # resize to (H, W) (one number: square); None: keep, all must agree
    channels: int = 3  # 3: RGB, 1: greyscale
    mean: tuple[float, ...] | None = None  # per-channel normalisation; None: measured on the training images
    std: tuple[float, ...] | None = None
    # tokens
    path: str | None = None  # a text file or a token tensor file (.pt, .npy); None: the embedded corpus
    seq_len: int = 64

    def __post_init__(self) -> None:
        try:
            get_dataset(self.name)
        except NMechError as exc:  # in a config it is the config that is wrong
            raise ConfigError(f"dataset.name: {exc.what}", exc.fix) from None


@dataclass(frozen=True)
class DataOptions:
    """What a builder may read besides the split: where the data is, whether to augment it, the seed, and the
    knobs of the built-in datasets (cifar: verify_checksums; digits, imagefolder, factories, tokens: test_fraction;
    synthetic: num_samples (None: 512 for train, 128 otherwise), input_shape, dtype, num_classes, targets,
    vocab_size; imagefolder: image_size, channels, mean, std; tokens: path, seq_len, vocab_size). The fields are
    those of `DatasetConfig` of the same name, with the defaults the built-ins have always had."""

    root: Path
    augment: bool
    seed: int = 0
    verify_checksums: bool = False
    test_fraction: float = 0.2
    num_samples: int | None = None
    input_shape: tuple[int, ...] = (3, 32, 32)
    dtype: InputDtype = "float32"
    num_classes: int = 10
    targets: TargetKind = "class"
    vocab_size: int | None = None
    image_size: tuple[int, ...] | None = None
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    path: Path | None = None
    seq_len: int = 64


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: `build(split, options)` loads split "train", "val" or "test".

    keys: the DatasetConfig keys the builder reads (besides COMMON_KEYS). tolerated: keys it does not read but
    accepts (configs written when nothing was refused keep loading). validate(cfg) raises ConfigError for a
    dataset section this dataset cannot honour; None means `refuse_unused_keys`.
    """

    name: str
    build: Callable[[str, DataOptions], DatasetInfo]
    description: str
    aliases: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    validate: Callable[[DatasetConfig], None] | None = None
    tolerated: tuple[str, ...] = ()

    def check(self, cfg: DatasetConfig) -> None:
        """Run `validate`, or (without one) `refuse_unused_keys`."""
        if self.validate is not None:
            self.validate(cfg)
        else:
            self.refuse_unused_keys(cfg)

    def refuse_unused_keys(self, cfg: DatasetConfig) -> None:
        """ConfigError when a key outside `keys`, `tolerated` and COMMON_KEYS is set away from its default: it would
        be ignored."""
        unused = changed_fields(cfg, (*COMMON_KEYS, *self.keys, *self.tolerated))
        if unused:
            raise ConfigError(f"dataset.{unused[0]}: {self.name} does not read {', '.join(unused)}",
                              f"remove {', '.join('dataset.' + k for k in unused)}"
                              + (f"; {self.name} reads {', '.join(self.keys)}" if self.keys else ""))


def accept_any_keys(cfg: DatasetConfig) -> None:
    """A validator that accepts every key (for a dataset that reads whatever it is given)."""


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


#: Resolvers of dataset names that are patterns rather than registered names (`package.module:factory`, see
#: datasets/factory.py): each returns the DatasetSpec of a name it handles and None otherwise.
RESOLVERS: list[Callable[[str], DatasetSpec | None]] = []


def register_dataset_resolver(resolver: Callable[[str], DatasetSpec | None]) -> Callable[[str], DatasetSpec | None]:
    """Add a resolver that `get_dataset` asks about names that are not registered; returns it."""
    RESOLVERS.append(resolver)
    return resolver


def get_dataset(name: str) -> DatasetSpec:
    """The spec for `name` (any case, aliases allowed; names a resolver handles, e.g. `package.module:factory`);
    DatasetError with close matches if there is none."""
    spec = DATASETS.get(_canonical(name))
    for resolve in RESOLVERS if spec is None else ():
        spec = resolve(name)
        if spec is not None:
            return spec
    if spec is None:
        close = difflib.get_close_matches(_canonical(name), dataset_names(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DatasetError(f"unknown dataset {name!r}", f"{hint}datasets: {', '.join(dataset_names())}, or "
                           "package.module:factory (a function returning a torch Dataset of (input, target) pairs)")
    return spec


def validate_dataset_config(cfg: DatasetConfig) -> None:
    """The value checks of the dataset section: the loader's own, then the dataset spec's."""
    if cfg.num_workers < 0:
        raise ConfigError("dataset.num_workers: must be >= 0", "use 0 to load in the main process")
    if not 0 <= cfg.label_noise < 1:
        raise ConfigError(f"dataset.label_noise: must be in [0, 1), got {cfg.label_noise}",
                          "give the fraction of training labels to randomise, e.g. 0.3 (0 = clean labels)")
    positive = {"num_classes": cfg.num_classes, "num_samples": cfg.num_samples, "vocab_size": cfg.vocab_size,
                "seq_len": cfg.seq_len, "channels": cfg.channels}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"dataset.{key}: must be >= 1, got {value}", f"set dataset.{key} to a positive number")
    for key in ("input_shape", "image_size"):
        shape = getattr(cfg, key)
        if shape is not None and (not shape or any(s < 1 for s in shape)):
            raise ConfigError(f"dataset.{key}: must be positive sizes, got {list(shape)}", "e.g. [3, 32, 32]")
    if not 0 <= cfg.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction: must be in [0, 1), got {cfg.test_fraction}", "e.g. 0.2")
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
    label_noise: float = 0.0,
    **knobs: Any,
) -> DatasetInfo:
    """Load split `split` of dataset `name` (a registered name such as "digits", "tinyimagenet", "cifar10",
    "cifar100", "synthetic", "imagefolder", "tokens" (`dataset_names()` lists them), or `package.module:factory`).

    root: the data directory (default $NMECH_DATA or ./data); not used by digits, synthetic and tokens.
    augment: random crop (zero padding 4) + horizontal flip for image datasets; default on for split="train".
    seed: augmentation seed, held-out splits, synthetic data. "val" and "test" are the same held-out split
    for datasets that have only one (CIFAR's test batch, digits' test part, Tiny ImageNet's labelled val).
    knobs: the other fields of `DataOptions` (verify_checksums, test_fraction, num_samples, input_shape, dtype,
    num_classes, targets, vocab_size, image_size, channels, mean, std, path, seq_len); DatasetError for others.
    label_noise: the fraction of the train split's labels replaced by uniform random ones, drawn once from `seed`
    (`datasets/label_noise.py`; other splits are never changed).
    """
    spec = get_dataset(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {spec.name}", f"use one of {', '.join(SPLITS)}")
    fields = {f.name for f in dataclasses.fields(DataOptions)} - {"root", "augment", "seed"}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise DatasetError(f"load_dataset got unknown option(s) {unknown}", f"options: {', '.join(sorted(fields))}")
    if knobs.get("input_shape") is not None:
        knobs["input_shape"] = tuple(int(s) for s in knobs["input_shape"])
    if knobs.get("path") is not None:
        knobs["path"] = Path(knobs["path"])
    options = DataOptions(
        root=Path(root) if root is not None else default_root(),
        augment=(split == "train") if augment is None else bool(augment),
        seed=seed,
        **{k: v for k, v in knobs.items() if v is not None},  # None: the builder's default
    )
    info = spec.build(split, options)
    if label_noise and split == "train":
        if info.num_classes is None or not _is_class_label(info.dataset[0][1]):
            raise DatasetError(f"dataset.label_noise: {info.name}'s targets are not class labels",
                               "label_noise randomises class labels only: set it to 0 for this dataset")
        info = dataclasses.replace(info, dataset=NoisyLabels(info.dataset, label_noise, info.num_classes, seed))
    return info


def _is_class_label(y: Any) -> bool:
    """An int, or an integer tensor with one element (what NoisyLabels replaces)."""
    if isinstance(y, Tensor):
        return y.numel() == 1 and not y.is_floating_point()
    return isinstance(y, int)


def dataset_from_config(cfg: DatasetConfig, split: Split, *, seed: int) -> DatasetInfo:
    """Split `split` of the dataset a config section names, seeded by the run's seed (`cfg.augment` applies to the
    train split; held-out splits take the default, i.e. no augmentation). Every DataOptions field the section has
    is passed on; a None keeps the builder's default."""
    shared = {f.name for f in dataclasses.fields(DataOptions)} & {f.name for f in dataclasses.fields(DatasetConfig)}
    knobs = {k: getattr(cfg, k) for k in shared - {"root", "augment"}}
    return load_dataset(cfg.name, cfg.root, split=split, augment=cfg.augment if split == "train" else None,
                        seed=seed, label_noise=cfg.label_noise, **knobs)
