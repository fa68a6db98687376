"""Datasets for the experiments, and a data loader that is a pure function of (seed, epoch).

Four datasets, all returning `(float tensor of shape input_shape, int label)`:

- "digits" (the default): scikit-learn's 8x8 handwritten digits (ships with scikit-learn, so the demo
  needs no download): 1x8x8 tensors standardised with the training split's mean and std, and a fixed
  stratified train/test split chosen by `seed`.
- "tinyimagenet": a local `tiny-imagenet-200` directory in its standard layout (see TINYIMAGENET_LAYOUT);
  class k is the k-th wnid in sorted order (what the paper's ImageFolder-based loader used).
- "cifar10" / "cifar100": a local directory in torchvision's format, read by torchvision.datasets with
  download=False (checksums are only verified when asked, so small test fixtures load).
- "synthetic": seeded class-dependent Gaussian patterns x = signal * mu_y + noise * eps of any shape and
  class count, generated per index on the fly, for tests and benchmarks.

Image datasets are normalised with the per-channel statistics of the paper's code
(danielkunin/neural-mechanics utils/load.py) and optionally augmented as there: random crop of the
zero-padded image (padding 4) and horizontal flip, on by default for the training split. Augmentation
draws its randomness from a generator seeded by (seed, epoch, index), not from the global RNG, and
`make_loader` shuffles with a permutation seeded by (seed, epoch): an epoch's batches are the same whatever
the number of workers, and a resumed run can reproduce any epoch by `loader.set_epoch(epoch)`.

Data that needs a download cannot be fetched here: a missing or malformed directory raises
DatasetError saying what layout was expected, what was found, and how to get the data.
"""

from __future__ import annotations

import difflib
import os
import pickle
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neural_mechanics.errors import DatasetError

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

DATASET_NAMES: tuple[str, ...] = ("digits", "tinyimagenet", "cifar10", "cifar100", "synthetic")
_ALIASES = {"tiny-imagenet": "tinyimagenet", "tiny_imagenet": "tinyimagenet", "tiny-imagenet-200": "tinyimagenet"}

#: Per-channel (mean, std) used by the paper's code for normalisation.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "tinyimagenet": ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282)),
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_LAYOUT = """tiny-imagenet-200/
    wnids.txt                              one wnid per line (200 lines)
    words.txt                              wnid<TAB>human-readable name (optional)
    train/<wnid>/images/<wnid>_<k>.JPEG    500 images per class
    train/<wnid>/<wnid>_boxes.txt          (not needed)
    val/images/val_<k>.JPEG                10000 images
    val/val_annotations.txt                file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1 per line
    test/images/test_<k>.JPEG              (unlabelled, not used)"""

_CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        ("test_batch",),
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta"),
}


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


# -- shared pieces -----------------------------------------------------------------------------


def default_root() -> Path:
    """Where datasets live unless `root` is given: $NMECH_DATA, else ./data."""
    return Path(os.environ.get("NMECH_DATA", "data"))


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing), so (seed, epoch, index) streams do not collide."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


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
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, index))
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


# -- digits ------------------------------------------------------------------------------------


def _load_digits(split: str, seed: int, test_fraction: float) -> DatasetInfo:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = float(x_train.mean()), float(x_train.std())
    xs, ys = (x_train, y_train) if split == "train" else (x_test, y_test)
    tensor = torch.from_numpy((xs - mean) / std).view(-1, 1, 8, 8)
    return DatasetInfo(
        dataset=TensorClassification(tensor, torch.from_numpy(ys)),
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
        split=split,
        classes=tuple(str(d) for d in range(10)),
    )


# -- synthetic ---------------------------------------------------------------------------------


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
        proto_gen = torch.Generator().manual_seed(_mix_seed(seed, 1_000_003))
        self.prototypes = torch.randn((num_classes, *self.input_shape), generator=proto_gen)
        label_gen = torch.Generator().manual_seed(_mix_seed(seed, 2_000_003, self.split_id))
        self.labels = (torch.randperm(num_samples, generator=label_gen) % num_classes).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        label = int(self.labels[index])
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, 3_000_017, self.split_id, index))
        eps = torch.randn(self.input_shape, generator=gen)
        return self.signal * self.prototypes[label] + self.noise * eps, label


# -- Tiny ImageNet -----------------------------------------------------------------------------


def _found(path: Path, limit: int = 12) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return f"{path} is empty"
    more = f" ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return f"{path} contains: {', '.join(entries[:limit])}{more}"


def _tiny_error(problem: str, root: Path, seen: Path) -> DatasetError:
    return DatasetError(
        f"{problem}\n  expected layout:\n{_indent(TINYIMAGENET_LAYOUT)}\n  found: {_found(seen)}",
        f"download {TINYIMAGENET_URL} and unzip it into {root} (so that {root}/tiny-imagenet-200/wnids.txt exists), "
        "or pass root=<the tiny-imagenet-200 directory or its parent>",
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def find_tinyimagenet_dir(root: Path) -> Path:
    """`root` itself if it holds wnids.txt, else root/tiny-imagenet-200; DatasetError if neither exists."""
    if (root / "wnids.txt").is_file():
        return root
    nested = root / "tiny-imagenet-200"
    if nested.is_dir():
        if not (nested / "wnids.txt").is_file():
            raise _tiny_error(f"{nested} has no wnids.txt", root, nested)
        return nested
    raise _tiny_error(f"no Tiny ImageNet directory at {root}", root, root)


class TinyImageNet(Dataset[tuple[Tensor, int]]):
    """Tiny ImageNet split read in place (no files are moved): ([0, 1] float 3x64x64 image, class index).

    Class k is the k-th wnid of wnids.txt in sorted order. train: train/<wnid>/images/*.JPEG; val (and test,
    since the official test labels are not public - the paper evaluates on val): val/images per
    val/val_annotations.txt.
    """

    image_size = 64

    def __init__(self, root: str | os.PathLike[str], split: str = "train"):
        self.root = Path(root)
        self.dir = find_tinyimagenet_dir(self.root)
        wnids = [w.strip() for w in (self.dir / "wnids.txt").read_text().splitlines() if w.strip()]
        if not wnids:
            raise _tiny_error(f"{self.dir / 'wnids.txt'} lists no classes", self.root, self.dir)
        self.wnids = tuple(sorted(set(wnids)))
        self.class_index = {w: i for i, w in enumerate(self.wnids)}
        self.names = self._read_words()
        self.split = split
        self.samples = self._train_samples() if split == "train" else self._val_samples()

    def _read_words(self) -> dict[str, str]:
        words = self.dir / "words.txt"
        names: dict[str, str] = {}
        if words.is_file():
            for line in words.read_text(errors="replace").splitlines():
                wnid, _, name = line.partition("\t")
                if wnid in self.class_index:
                    names[wnid] = name.strip()
        return names

    def _train_samples(self) -> list[tuple[Path, int]]:
        train = self.dir / "train"
        if not train.is_dir():
            raise _tiny_error(f"{train} is missing", self.root, self.dir)
        missing = [w for w in self.wnids if not (train / w / "images").is_dir()]
        if missing:
            shown = ", ".join(f"train/{w}/images" for w in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise _tiny_error(
                f"{len(missing)} of the {len(self.wnids)} classes in wnids.txt have no image folder: {shown}{more}",
                self.root,
                train,
            )
        samples: list[tuple[Path, int]] = []
        for w in self.wnids:
            files = sorted(p for p in (train / w / "images").iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            if not files:
                raise _tiny_error(f"train/{w}/images has no .JPEG files", self.root, train / w / "images")
            samples.extend((p, self.class_index[w]) for p in files)
        return samples

    def _val_samples(self) -> list[tuple[Path, int]]:
        val = self.dir / "val"
        annotations = val / "val_annotations.txt"
        images = val / "images"
        if not annotations.is_file():
            raise _tiny_error(f"{annotations} is missing (it gives each val image's class)", self.root, val)
        if not images.is_dir():
            raise _tiny_error(f"{images} is missing", self.root, val)
        present = {p.name for p in images.iterdir()}
        samples = []
        for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise _tiny_error(
                    f"{annotations} line {lineno} is not tab separated (file, wnid, x0, y0, x1, y1): {line!r}",
                    self.root,
                    val,
                )
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in self.class_index:
                raise _tiny_error(f"{annotations} line {lineno}: wnid {wnid!r} is not in wnids.txt", self.root, val)
            if name not in present:
                raise _tiny_error(f"{annotations} line {lineno}: {name} is not in {images}", self.root, images)
            samples.append((images / name, self.class_index[wnid]))
        if not samples:
            raise _tiny_error(f"{annotations} lists no images", self.root, val)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # a few Tiny ImageNet images are greyscale
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}", "re-download and unzip Tiny ImageNet") from exc
        if rgb.size != (self.image_size, self.image_size):
            raise DatasetError(
                f"{path} is {rgb.size[0]}x{rgb.size[1]}, but Tiny ImageNet images are 64x64",
                "use the unmodified tiny-imagenet-200 release",
            )
        return pil_to_tensor(rgb).float().div(255.0), label


def _load_tinyimagenet(root: Path, split: str, augment: bool, seed: int) -> DatasetInfo:
    base = TinyImageNet(root, "train" if split == "train" else "val")
    mean, std = NORMALIZATION["tinyimagenet"]
    return DatasetInfo(
        dataset=NormalizedImages(base, mean, std, augment=augment, padding=4, seed=seed),
        num_classes=len(base.wnids),
        input_shape=(3, 64, 64),
        name="tinyimagenet",
        split=split,
        classes=base.wnids,
    )


# -- CIFAR -------------------------------------------------------------------------------------


def _cifar_error(name: str, problem: str, root: Path, seen: Path) -> DatasetError:
    folder, train, test, meta = _CIFAR_LAYOUT[name]
    layout = "\n".join(f"{folder}/{f}" for f in (*train, *test, meta))
    cls = "CIFAR10" if name == "cifar10" else "CIFAR100"
    return DatasetError(
        f"{problem}\n  expected layout (torchvision's python version) under {root}:\n{_indent(layout)}\n"
        f"  found: {_found(seen)}",
        f"on a machine with internet run `python -c \"import torchvision; torchvision.datasets.{cls}('DIR', "
        f'download=True)"`, then copy DIR/{folder} into {root}; or pass root=<the directory that contains {folder}>',
    )


def _load_cifar(name: str, root: Path, split: str, augment: bool, seed: int, verify_checksums: bool) -> DatasetInfo:
    import torchvision

    folder, train_files, test_files, meta_file = _CIFAR_LAYOUT[name]
    if root.name == folder:  # accept the batches directory itself
        root = root.parent
    base_dir = root / folder
    if not base_dir.is_dir():
        raise _cifar_error(name, f"no {folder} directory in {root}", root, root)
    missing = [f for f in (*train_files, *test_files, meta_file) if not (base_dir / f).is_file()]
    if missing:
        raise _cifar_error(name, f"{base_dir} is missing {', '.join(missing)}", root, base_dir)
    tv_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls: Any = tv_cls
    if not verify_checksums:  # same reader, md5 checks off (check_integrity(path, None) only tests existence)
        cls = type(
            f"Unverified{tv_cls.__name__}",
            (tv_cls,),
            {
                "train_list": [[f, None] for f, _ in tv_cls.train_list],
                "test_list": [[f, None] for f, _ in tv_cls.test_list],
                "meta": {**tv_cls.meta, "md5": None},
            },
        )
    try:
        ds = cls(str(root), train=split == "train", download=False)
        images = np.asarray(ds.data)
        labels = list(ds.targets)
        classes = tuple(str(c) for c in ds.classes)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise _cifar_error(
            name, f"could not read {name} from {base_dir}: {type(exc).__name__}: {exc}", root, base_dir
        ) from exc
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
        raise _cifar_error(
            name,
            f"{base_dir} holds arrays of shape {images.shape} with {len(labels)} labels; expected N x 32 x 32 x 3",
            root,
            base_dir,
        )
    mean, std = NORMALIZATION[name]
    return DatasetInfo(
        dataset=NormalizedImages(UInt8Images(images, labels), mean, std, augment=augment, padding=4, seed=seed),
        num_classes=10 if name == "cifar10" else 100,
        input_shape=(3, 32, 32),
        name=name,
        split=split,
        classes=classes,
    )


# -- entry points ------------------------------------------------------------------------------


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
) -> DatasetInfo:
    """Load split `split` of dataset `name` ("digits", "tinyimagenet", "cifar10", "cifar100", "synthetic").

    root: the data directory (default $NMECH_DATA or ./data); not used by digits and synthetic.
    augment: random crop (zero padding 4) + horizontal flip for image datasets; default on for split="train".
    seed: augmentation seed, digits' train/test split, synthetic data. "val" and "test" are the same held-out split
    for datasets that have only one (CIFAR's test batch, digits' test part, Tiny ImageNet's labelled val).
    test_fraction: digits only. num_samples (default 512 train / 128 otherwise), input_shape, num_classes: synthetic.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASET_NAMES:
        close = difflib.get_close_matches(key, DATASET_NAMES, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DatasetError(f"unknown dataset {name!r}", f"{hint}datasets: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {key}", f"use one of {', '.join(SPLITS)}")
    do_augment = (split == "train") if augment is None else bool(augment)
    if key == "digits":
        return _load_digits(split, seed, test_fraction)
    if key == "synthetic":
        n = num_samples if num_samples is not None else (512 if split == "train" else 128)
        ds = SyntheticImages(n, input_shape, num_classes, seed=seed, split=split)
        return DatasetInfo(
            ds, num_classes, ds.input_shape, "synthetic", split, tuple(str(k) for k in range(num_classes))
        )
    data_root = Path(root) if root is not None else default_root()
    if key == "tinyimagenet":
        return _load_tinyimagenet(data_root, split, do_augment, seed)
    return _load_cifar(key, data_root, split, do_augment, seed, verify_checksums)


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
            self.generator.manual_seed(_mix_seed(getattr(self, "seed", 0), epoch))
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
