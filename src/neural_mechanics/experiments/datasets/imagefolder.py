"""The "imagefolder" dataset: your own images, one folder per class (torchvision's ImageFolder layout).

    dataset: {name: imagefolder, root: /data/flowers}            # + image_size: 64, channels: 1, mean/std, ...

`root` holds either the class folders themselves (IMAGEFOLDER_LAYOUT, first form: a seeded, stratified
`test_fraction` of every class is held out) or `train/` plus `val/` and/or `test/` with the same class folders
(second form; "val" reads val/ and falls back to test/, "test" the other way round; with neither, the held-out part
comes from train/ as in the first form). Class k is the k-th class folder in sorted order (torchvision's
`find_classes`); image files are those torchvision recognises (IMG_EXTENSIONS), in sorted order.

Images are read with PIL, converted to RGB (`channels: 3`) or greyscale (`channels: 1`), resized to `image_size`
(H, W; one number for a square; bilinear) if given (otherwise every image must have the first image's size), scaled
to [0, 1], then normalised per channel: (x - mean) / std with `mean`/`std` from the config, or measured on up to
STATS_IMAGES training images spread evenly over the sorted file list (so they depend on the data only). The training
split is augmented like the other image datasets (random crop of the image zero-padded by 4, horizontal flip; seeded
by (seed, epoch, index)) unless `augment: false`. Loading is the same deterministic, resumable, DDP-sharded loader
as for every dataset (`make_loader`): the data order is a function of (seed, epoch) only.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.images import NormalizedImages, describe_dir, indent
from neural_mechanics.experiments.datasets.registry import DataOptions, DatasetInfo

IMAGEFOLDER_LAYOUT = """ROOT/<class>/<image>            one folder per class (a held-out part is split off), or
ROOT/train/<class>/<image>      with
ROOT/val/<class>/<image>        and/or
ROOT/test/<class>/<image>       the same class names"""

#: How many training images the per-channel mean and std are measured on when the config does not give them.
STATS_IMAGES = 256
_MODES = {1: "L", 3: "RGB"}


def _folder_error(problem: str, root: Path, seen: Path) -> DatasetError:
    return DatasetError(
        f"{problem}\n  expected layout (image files: .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp):\n"
        f"{indent(IMAGEFOLDER_LAYOUT)}\n  found: {describe_dir(seen)}",
        "point dataset.root at the directory that holds the class folders (or train/ and val/)",
    )


def _scan(directory: Path, class_to_idx: dict[str, int] | None, root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) of a class-folder tree; with `class_to_idx` the folders must be among its
    classes (a held-out folder read with the training split's classes)."""
    # torchvision is imported here, not at module level: importing it takes ~3 s of CPU (it loads torch._dynamo),
    # which every `nmech` command would pay (the registry imports this module).
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not directory.is_dir():
        raise _folder_error(f"{directory} is not a directory", root, directory)
    try:
        classes, found = find_classes(directory)
    except FileNotFoundError:
        raise _folder_error(f"{directory} has no class folders", root, directory) from None
    if class_to_idx is not None:
        extra = [c for c in classes if c not in class_to_idx]
        if extra:
            raise _folder_error(f"{directory} has class folders the training split lacks: {', '.join(extra[:5])}",
                                root, directory)
        classes, found = list(class_to_idx), class_to_idx
    try:
        samples = make_dataset(str(directory), found, extensions=IMG_EXTENSIONS, allow_empty=class_to_idx is not None)
    except FileNotFoundError as exc:  # a class folder without images
        raise _folder_error(f"{directory}: {str(exc).splitlines()[0]}", root, directory) from None
    if not samples:
        raise _folder_error(f"{directory} holds no image files", root, directory)
    return classes, [(str(p), int(c)) for p, c in samples]


def held_out_indices(labels: list[int], fraction: float, seed: int) -> list[int]:
    """A stratified, seeded held-out part: per class with n images, round(fraction * n) of them (at most n - 1, so
    every class keeps a training image), chosen by a permutation seeded by `seed`. Sorted indices."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for c in sorted(by_class):
        members = by_class[c]
        k = min(round(fraction * len(members)), len(members) - 1)
        order = torch.randperm(len(members), generator=gen).tolist()
        out.extend(members[j] for j in order[:k])
    return sorted(out)


class FolderImages(Dataset[tuple[Tensor, int]]):
    """(path, label) samples read as float C x H x W tensors in [0, 1]: PIL, converted to `channels` (1 or 3),
    resized to `size` (H, W) if given, else checked against the first image's size."""

    def __init__(self, samples: list[tuple[str, int]], channels: int, size: tuple[int, int] | None):
        self.samples = samples
        self.mode = _MODES[channels]
        self.resize = size is not None
        self.size = size if size is not None else self._size_of(samples[0][0])

    @staticmethod
    def _size_of(path: str) -> tuple[int, int]:
        try:
            with Image.open(path) as img:
                return img.size[1], img.size[0]
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}", "remove or replace the file") from exc

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # torchvision is imported when an image is read (see _scan)
        from torchvision.transforms.functional import pil_to_tensor

        path, label = self.samples[index]
        h, w = self.size
        try:
            with Image.open(path) as img:
                image = img.convert(self.mode)
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}", "remove or replace the file") from exc
        if image.size != (w, h):
            if self.resize:
                image = image.resize((w, h), Image.Resampling.BILINEAR)
            else:
                raise DatasetError(f"{path} is {image.size[0]}x{image.size[1]} but the first image is {w}x{h}",
                                   "set dataset.image_size (e.g. image_size: 64) to resize every image")
        return pil_to_tensor(image).float().div(255.0), label


def _folder_images(samples: list[tuple[str, int]], options: DataOptions) -> FolderImages:
    size = options.image_size
    if size is not None and len(size) > 2:
        raise DatasetError(f"dataset.image_size must be one or two numbers, got {list(size)}", "e.g. image_size: 64")
    hw = None if size is None else (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    return FolderImages(samples, options.channels, hw)


@functools.lru_cache(maxsize=8)
def _measured_stats(paths: tuple[str, ...], channels: int, size: tuple[int, ...] | None
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over every pixel of the images `paths` (cached: both splits of a run ask)."""
    options = DataOptions(root=Path("."), augment=False, channels=channels, image_size=size)
    images = _folder_images([(p, 0) for p in paths], options)
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for i in range(len(images)):
        x = images[i][0].double().flatten(1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _split_dirs(root: Path) -> dict[str, Path]:
    return {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}


def build_imagefolder(split: str, options: DataOptions) -> DatasetInfo:
    """Split `split` of the class-folder tree at `options.root` (see the module docstring)."""
    root = options.root
    if options.channels not in _MODES:
        raise DatasetError(f"dataset.channels must be 1 (greyscale) or 3 (RGB), got {options.channels}",
                           "set channels: 1 or channels: 3")
    if not root.is_dir():
        raise _folder_error(f"no image folder at {root}", root, root)
    dirs = _split_dirs(root)
    train_dir = dirs.get("train", root)
    classes, tree = _scan(train_dir, None, root)
    held_dir = None
    if "train" in dirs:
        order = ("val", "test") if split == "val" else ("test", "val")
        held_dir = next((dirs[d] for d in order if d in dirs), None)
    if held_dir is not None:  # train/ is the training split, the held-out folder the other
        train_samples = tree
        index = dict(zip(classes, range(len(classes)), strict=True))
        held_samples = _scan(held_dir, index, root)[1] if split != "train" else []
        where = held_dir if split != "train" else train_dir
    else:  # a seeded, stratified part of the tree is held out
        held = set(held_out_indices([c for _, c in tree], options.test_fraction, options.seed))
        train_samples = [s for i, s in enumerate(tree) if i not in held]
        held_samples = [s for i, s in enumerate(tree) if i in held]
        where = train_dir
    samples = train_samples if split == "train" else held_samples
    if not samples:
        raise _folder_error(f"no {split} images: {len(tree)} images in {train_dir}, test_fraction "
                            f"{options.test_fraction} holds out {len(held_samples)} of them", root, train_dir)
    if options.mean is not None and options.std is not None:
        mean, std = options.mean, options.std
    else:
        step = max(len(train_samples) // STATS_IMAGES, 1)  # the training split's images only
        paths = tuple(p for p, _ in train_samples[::step][:STATS_IMAGES])
        mean, std = _measured_stats(paths, options.channels, options.image_size)
        mean = options.mean if options.mean is not None else mean
        std = options.std if options.std is not None else std
    if len(mean) != options.channels or len(std) != options.channels or min(std) <= 0:
        raise DatasetError(f"dataset.mean and dataset.std need {options.channels} values (std > 0), got "
                           f"mean {list(mean)}, std {list(std)}", "give one value per channel")
    base = _folder_images(samples, options)
    return DatasetInfo(
        dataset=NormalizedImages(base, mean, std, augment=options.augment, padding=4, seed=options.seed),
        num_classes=len(classes),
        input_shape=(options.channels, *base.size),
        name="imagefolder",
        split=split,
        classes=tuple(classes),
        notes=(f"imagefolder {os.fspath(where)}: {len(samples)} {split} images, {len(classes)} classes, "
               f"normalised with mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}",),
    )
