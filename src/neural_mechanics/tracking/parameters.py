"""Symmetry member names -> the model's parameters, through the wrappers that prefix names (DDP, torch.compile).

`find_symmetries` runs on the bare model, but a training loop may hand the tracker the wrapped one: DDP and
DataParallel put the module under "module.", torch.compile under "_orig_mod.". Names match up to those prefixes
on either side.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from neural_mechanics.errors import TrackerError

__all__ = ["canonical_name", "resolve_parameters"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter name without wrapper prefixes ("module." of DDP / DataParallel, "_orig_mod." of torch.compile)."""
    changed = True
    while changed:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre):], True
    return name


def resolve_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Map symmetry member names to the model's parameters, tolerating wrapper prefixes on either side."""
    named = dict(model.named_parameters())
    canon: dict[str, nn.Parameter] = {}
    for n, param in named.items():
        canon.setdefault(canonical_name(n), param)
    out: dict[str, nn.Parameter] = {}
    for name in names:
        p: nn.Parameter | None = named.get(name)
        if p is None:
            p = canon.get(canonical_name(name))
        if p is None:
            raise TrackerError(f"symmetry member names parameter {name!r}, which the model does not have",
                               "detect the symmetries on this model (or the model it wraps): names must match "
                               "model.named_parameters() up to a 'module.' prefix")
        out[name] = p
    return out
