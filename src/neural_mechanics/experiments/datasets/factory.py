"""Datasets from your own code: `dataset: {name: "mypkg.data:build"}` in a training config.

The name is `package.module:attr`, imported like a model spec (`experiments.importing`: the current directory is
searched first). What `attr` may be:

- a callable with a `split` parameter: called as `attr(split="train")` (and "val" / "test" for evaluation), with
  `seed=` too when it takes one; it returns that split's Dataset;
- any other callable: called once per seed (with `seed=` when it takes one) and returning a Dataset (the training
  data: a seeded `test_fraction` of it is held out for evaluation and the rest is trained on), a pair
  `(train, eval)` of Datasets, or a mapping with "train" and "val" and/or "test";
- a Dataset instance: the training data, as above.

Items must be `(input, target)` pairs: the input a tensor (or a NumPy array), the target an int (a class), a float or
a tensor (per-pixel classes, next tokens, real values), whatever the config's `loss` expects (checked on the first
batch before training). The class count (the model's output width) is the dataset's `num_classes` attribute, else
the length of its `classes`, else unknown (the model keeps its default unless the config sets `num_classes`).
The loader is the same deterministic, resumable, DDP-sharded one as for every dataset.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.registry import (
    DataOptions,
    DatasetInfo,
    DatasetSpec,
    register_dataset_resolver,
)
from neural_mechanics.experiments.importing import accepts_keyword, import_object

_FORMS = ("return a torch Dataset of (input, target) pairs, a pair (train, eval) of them, or a dict with 'train' and "
          "'val'/'test'; or take a split= argument and return that split")


def _call(spec: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    kwargs = {k: v for k, v in kwargs.items() if k == "split" or accepts_keyword(fn, k)}
    try:
        return fn(**kwargs)
    except Exception as exc:  # the user's code: say which call failed, keep the cause
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise DatasetError(f"dataset factory {spec}({args}) raised {type(exc).__name__}: {exc}",
                           f"fix the factory; it must be callable as {spec}({args}) and {_FORMS}") from exc


def _is_dataset(obj: Any) -> bool:
    """A dataset instance (a torch Dataset, or any sized indexable that is not a mapping, string or tuple)."""
    if isinstance(obj, type):
        return False
    return isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                        and not isinstance(obj, Mapping | str | bytes | tuple))


@functools.lru_cache(maxsize=4)
def _whole(spec: str, seed: int) -> Any:
    """What a factory without a `split` parameter returns (called once per (spec, seed) in a process)."""
    obj = import_object(spec, DatasetError, "dataset")
    return _call(spec, obj, seed=seed) if callable(obj) and not _is_dataset(obj) else obj


def _split_of(spec: str, result: Any, split: str, options: DataOptions) -> Dataset[Any]:
    """Split `split` of a factory's whole result (see the module docstring)."""
    if isinstance(result, Mapping):
        keys = ("train",) if split == "train" else ((split, "test", "val") if split == "val" else (split, "val"))
        for key in keys:
            if key in result:
                return result[key]  # type: ignore[no-any-return]
        raise DatasetError(f"dataset factory {spec} returned a mapping without {' or '.join(map(repr, keys[:2]))} "
                           f"(its keys: {', '.join(map(str, result))})", _FORMS)
    if isinstance(result, tuple | list) and len(result) == 2 and all(map(_is_dataset, result)):
        return result[0] if split == "train" else result[1]  # type: ignore[no-any-return]
    if not _is_dataset(result):
        raise DatasetError(f"dataset factory {spec} returned a {type(result).__name__}, not a Dataset", _FORMS)
    n = len(result)
    n_held = min(round(options.test_fraction * n), n - 1)
    if n_held < 1:
        raise DatasetError(f"dataset factory {spec} returned one Dataset of {n} items and test_fraction "
                           f"{options.test_fraction} holds none of them out for evaluation",
                           "raise dataset.test_fraction, or return (train, eval) from the factory")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed)).tolist()
    held = sorted(order[:n_held])
    return Subset(result, held if split != "train" else sorted(order[n_held:]))


def _shape_of(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, Tensor | np.ndarray):
        return tuple(int(s) for s in x.shape)
    return None


def _num_classes(dataset: Any) -> int | None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    n = getattr(dataset, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    classes = getattr(dataset, "classes", None)
    return len(classes) if isinstance(classes, Sequence) and not isinstance(classes, str) and classes else None


def build_factory(spec: str, split: str, options: DataOptions) -> DatasetInfo:
    """Split `split` of the dataset factory `spec` (see the module docstring), checked on its first item."""
    obj = import_object(spec, DatasetError, "dataset")
    if callable(obj) and not _is_dataset(obj) and accepts_keyword(obj, "split"):
        dataset = _call(spec, obj, split=split, seed=options.seed)
        if not _is_dataset(dataset):
            raise DatasetError(f"dataset factory {spec}(split={split!r}) returned a {type(dataset).__name__}, not "
                               "a Dataset", _FORMS)
    else:
        dataset = _split_of(spec, _whole(spec, options.seed), split, options)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DatasetError(f"the {split} split of dataset {spec} is empty", "give every split at least one item")
    try:
        item = dataset[0]
    except Exception as exc:  # the user's code
        raise DatasetError(f"reading item 0 of the {split} split of dataset {spec} raised {type(exc).__name__}: "
                           f"{exc}", "fix the dataset's __getitem__") from exc
    if not isinstance(item, tuple | list) or len(item) != 2:
        what = f"a dict with keys {list(item)}" if isinstance(item, Mapping) else type(item).__name__
        raise DatasetError(f"the items of dataset {spec} must be (input, target) pairs, item 0 is {what}",
                           "return (input, target) from __getitem__ (e.g. (tensor, label))")
    shape = _shape_of(item[0])
    if shape is None:
        raise DatasetError(f"the inputs of dataset {spec} must be tensors, item 0's input is a "
                           f"{type(item[0]).__name__}", "return a torch.Tensor (or a NumPy array) as the input")
    return DatasetInfo(dataset, _num_classes(dataset), shape, spec, split,
                       notes=(f"dataset {spec}: {len(dataset)} {split} items",))  # type: ignore[arg-type]


@register_dataset_resolver
def resolve_factory(name: str) -> DatasetSpec | None:
    """The DatasetSpec of a `package.module:factory` name (imported now, so a typo fails when the config loads)."""
    if ":" not in name:
        return None
    import_object(name, DatasetError, "dataset")
    return DatasetSpec(name, partial(build_factory, name), f"your dataset factory {name}", keys=("test_fraction",))
