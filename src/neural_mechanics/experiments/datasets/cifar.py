"""The "cifar10" and "cifar100" datasets: a local directory in torchvision's format (the python version), read by
torchvision.datasets with download=False. Checksums are only verified when asked (`verify_checksums`), so small
test fixtures load.

They cannot be downloaded here: a missing or malformed directory raises DatasetError saying what layout was
expected, what was found, and how to get the data.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.images import (
    NORMALIZATION,
    NormalizedImages,
    UInt8Images,
    describe_dir,
    indent,
)
from neural_mechanics.experiments.datasets.registry import DataOptions, DatasetInfo

_CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        ("test_batch",),
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta"),
}


def _cifar_error(name: str, problem: str, root: Path, seen: Path) -> DatasetError:
    folder, train, test, meta = _CIFAR_LAYOUT[name]
    layout = "\n".join(f"{folder}/{f}" for f in (*train, *test, meta))
    cls = "CIFAR10" if name == "cifar10" else "CIFAR100"
    return DatasetError(
        f"{problem}\n  expected layout (torchvision's python version) under {root}:\n{indent(layout)}\n"
        f"  found: {describe_dir(seen)}",
        f"on a machine with internet run `python -c \"import torchvision; torchvision.datasets.{cls}('DIR', "
        f'download=True)"`, then copy DIR/{folder} into {root}; or pass root=<the directory that contains {folder}>',
    )


def build_cifar(name: str, split: str, options: DataOptions) -> DatasetInfo:
    """CIFAR `name` ("cifar10" or "cifar100"): the five training batches for "train", the test batch otherwise."""
    # torchvision is imported here, not at module level: importing it takes ~3 s of CPU (it loads torch._dynamo),
    # which every `nmech` command would pay (the registry imports this module).
    import torchvision

    root, augment, seed, verify_checksums = options.root, options.augment, options.seed, options.verify_checksums
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
