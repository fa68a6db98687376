"""Typed config sections: mapping -> frozen dataclass with type checking, and the helpers validators share.

The training config (`experiments.config`) and the sections its registries own (`OptimizerConfig` in
`experiments.optimizers`, `DatasetConfig` in `experiments.datasets`) are frozen dataclasses. `from_mapping`
builds one from a YAML-shaped mapping: every key must be a field (else a ConfigError naming the key, the
valid keys there and close matches) and every value is coerced to the field's type losslessly (else a
ConfigError saying which type was expected). `check` and `changed_fields` are the two idioms the validators
of config values use.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from neural_mechanics.errors import ConfigError


def check(ok: bool, key: str, problem: str, fix: str) -> None:
    """Raise ConfigError("KEY: PROBLEM", FIX) unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {problem}", fix)


def changed_fields(section: Any, allowed: Iterable[str]) -> list[str]:
    """The fields of dataclass instance `section` that are not in `allowed` and differ from their defaults.

    Validators use it to refuse a key that the chosen optimizer or dataset would silently ignore.
    """
    keep = set(allowed)
    out = []
    for f in dataclasses.fields(section):
        if f.name in keep:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(section, f.name) != default:
            out.append(f.name)
    return out


def type_name(tp: Any) -> str:
    """How a field's type is written in error messages: `float`, `null | int`, `list of 2 (float, float)`, ..."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or _Mismatch. Lossless coercions only: int -> float, integral float -> int,
    numeric strings (YAML 1.1 reads 1e-4 as a string) -> int/float, list -> tuple."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            if isinstance(value, str | int | float) and len(get_args(tp)) == 2 and get_args(tp)[1] is Ellipsis:
                value = [value]  # a single item for a variable-length list
            else:
                raise _Mismatch
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
            value = {"name": value}  # shorthand: `optimizer: adam`, `dataset: cifar10`
        if not isinstance(value, Mapping):
            raise _Mismatch
        return from_mapping(tp, value, key + ".")  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise _Mismatch from None
            if f.is_integer():
                return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config schema uses unsupported type {tp!r} at {key}")  # a bug here, not user input


def unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    """The error for a key that section `cls` (at dotted `prefix`) does not have: close matches and the valid keys."""
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    where = prefix.rstrip(".") or "the top level"
    return ConfigError(f"unknown config key {prefix + key!r}", f"{hint}valid keys in {where}: {', '.join(valid)}")


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from `data` (missing keys take their defaults); ConfigError on bad keys/types."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise unknown_key(cls, str(key), prefix)
        try:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
        except _Mismatch:
            raise ConfigError(
                f"{prefix + key}: expected {type_name(hints[key])}, got {value!r} ({type(value).__name__})",
                f"set {prefix + key} to a value of type {type_name(hints[key])}",
            ) from None
    return cls(**kwargs)
