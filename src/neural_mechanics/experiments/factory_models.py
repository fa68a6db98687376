"""A `package.module:factory` MODEL: import the object it names and build the nn.Module from it.

The module is imported the current directory first, as `python -m` does (`experiments.importing`), and the attribute
taken (dotted paths such as `pkg.mod:Outer.build` work). A callable is called, with `num_classes=` when it accepts it;
a result that is an `nn.Module` class is instantiated the same way; an `nn.Module` instance is used as is. What the
model or factory says of its inputs (an `input_shape` attribute) and classes (a `num_classes` default) is read here;
when it says nothing, `infer_input_shape` and `infer_num_classes` guess from its first and last layers.
experiments/specs.py turns the result into a `ResolvedModel`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from neural_mechanics.errors import ModelSpecError
from neural_mechanics.experiments.importing import accepts_keyword, import_object

__all__ = ["infer_input_shape", "infer_num_classes", "resolve_import"]



def _default_num_classes(fn: Callable[..., Any]) -> int | None:
    try:
        p = inspect.signature(fn).parameters.get("num_classes")
    except (TypeError, ValueError):
        return None
    return p.default if p is not None and isinstance(p.default, int) else None


def _call(fn: Callable[..., Any], num_classes: int | None, what: str) -> Any:
    try:
        if num_classes is not None and accepts_keyword(fn, "num_classes"):
            return fn(num_classes=num_classes)
        return fn()
    except Exception as exc:
        raise ModelSpecError(
            f"{what} raised {type(exc).__name__}: {exc}",
            "a factory must be callable with no arguments (or with num_classes=...) and return an nn.Module; "
            "fix the factory or wrap it in one that supplies its arguments",
        ) from exc


def infer_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """Guess one example's shape from the first parameterised layer in registration order."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 64, 64)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 128)
        if isinstance(m, nn.Conv3d):
            return (m.in_channels, 16, 64, 64)
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.Embedding | nn.EmbeddingBag):
            return None  # token inputs: a float example would be wrong
    return None


def infer_num_classes(model: nn.Module) -> int | None:
    """Guess the number of classes: the output width of the last nn.Linear in registration order (None: no Linear)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
    return last


def _shape_attr(obj: Any) -> tuple[int, ...] | None:
    shape = getattr(obj, "input_shape", None)
    if isinstance(shape, tuple | list) and shape and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    return None


def resolve_import(spec: str, num_classes: int | None) -> tuple[nn.Module, tuple[int, ...] | None, int | None]:
    """Build the model `spec` (package.module:factory) names: (model, its `input_shape` attribute or the factory's,
    num_classes given or the factory's default; None where unknown). ModelSpecError for anything else."""
    obj = import_object(spec, ModelSpecError, "model spec")
    shape = _shape_attr(obj)
    factory_classes = _default_num_classes(obj) if callable(obj) else None
    if isinstance(obj, nn.Module):
        if num_classes is not None:
            raise ModelSpecError(
                f"{spec} is an already-built nn.Module, so num_classes={num_classes} cannot be applied",
                "point the spec at a factory function or the class instead, or drop num_classes",
            )
        result: Any = obj
    elif callable(obj):
        result = _call(obj, num_classes, spec)
        if isinstance(result, type) and issubclass(result, nn.Module):
            factory_classes = _default_num_classes(result) or factory_classes
            result = _call(result, num_classes, f"{spec}() returned {result.__name__}, and {result.__name__}()")
    else:
        raise ModelSpecError(
            f"{spec} is a {type(obj).__name__}, not a factory, class or nn.Module", "name a function or class"
        )
    if not isinstance(result, nn.Module):
        raise ModelSpecError(
            f"{spec} returned a {type(result).__name__}, not an nn.Module",
            "make the factory return a torch.nn.Module (an instance or an nn.Module class)",
        )
    shape = _shape_attr(result) or shape
    classes = num_classes if num_classes is not None else factory_classes
    return result, shape, classes

