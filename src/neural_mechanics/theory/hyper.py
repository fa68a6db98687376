"""Per-group hyperparameters of one optimizer step, as tensors.

The exact recurrences (`exact.py`) and the paper's continuous model (`continuous.py`) are vectorised
over G symmetry groups, so every hyperparameter they read is a tensor of shape [G] (or anything that
broadcasts against one: a 0-d tensor, a Python number). `Hyper` bundles the torch.optim.SGD knobs of
step k; `Hyper.from_sgd_group` reads one param_group and `Hyper.from_param_groups` gathers per-group
values through an index (group g -> the param_group its members live in). Both read the optimizer at
every step, so any learning-rate scheduler is followed.

`resolved(like)` turns every field into a tensor with the dtype and device of `like` (booleans stay
boolean); the step functions call it first, so callers may pass plain floats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from neural_mechanics.theory.errors import TheoryError

Num = Tensor | float | bool

_FLOAT_FIELDS = ("lr", "momentum", "dampening", "weight_decay")
_BOOL_FIELDS = ("nesterov", "maximize")


def _as(x: Num, like: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=dtype)
    return torch.full((), x, device=like.device, dtype=dtype)  # a fill: no host-to-device copy on CUDA


def _filled(values: Sequence[float | bool], dtype: torch.dtype, device: torch.device) -> Tensor:
    """`values` as a tensor on `device` made by fills, not copied from the host: on CUDA a copy from pageable host
    memory synchronises with the host, and the tracker reads the param groups at every step (schedules)."""
    out = torch.full((len(values),), values[0], dtype=dtype, device=device)
    for j, v in enumerate(values[1:], start=1):
        if v != values[0]:
            out[j:j + 1].fill_(v)
    return out


class ResolvedHyper(NamedTuple):
    """`Hyper` with every field a tensor on one device (floats in the charge dtype, flags as bool)."""

    lr: Tensor
    momentum: Tensor
    dampening: Tensor
    weight_decay: Tensor
    nesterov: Tensor
    maximize: Tensor


@dataclass
class Hyper:
    """torch.optim.SGD hyperparameters of one step, per group: each a tensor [G] or a broadcastable scalar.

    lr = eta_k, momentum = beta, dampening = tau, weight_decay = lambda (coupled: d = g + lambda theta),
    nesterov (bool), maximize (bool: torch then steps along -g, which flips the sign of the breaking term B).
    """

    lr: Num
    momentum: Num = 0.0
    dampening: Num = 0.0
    weight_decay: Num = 0.0
    nesterov: Num = False
    maximize: Num = False

    def resolved(self, like: Tensor) -> ResolvedHyper:
        """Every field as a tensor on `like`'s device: floats in `like.dtype`, nesterov/maximize as bool."""
        out: dict[str, Tensor] = {}
        for name in _FLOAT_FIELDS:
            out[name] = _as(getattr(self, name), like, like.dtype)
        for name in _BOOL_FIELDS:
            out[name] = _as(getattr(self, name), like, torch.bool)
        return ResolvedHyper(**out)

    @classmethod
    def from_sgd_group(cls, group: Mapping[str, Any], *, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float64) -> Hyper:
        """0-d tensors read from one torch.optim.SGD param_group (missing keys take SGD's defaults)."""
        vals: dict[str, Tensor] = {}
        for name in _FLOAT_FIELDS:
            vals[name] = torch.as_tensor(group.get(name, 0.0), dtype=dtype).to(device)
        for name in _BOOL_FIELDS:
            vals[name] = torch.as_tensor(bool(group.get(name, False))).to(device)
        if "lr" not in group:
            raise TheoryError("the param_group has no 'lr'", "pass a torch.optim.SGD param_group")
        return cls(**vals)

    @classmethod
    def from_param_groups(cls, param_groups: Sequence[Mapping[str, Any]], index: Tensor, *,
                          dtype: torch.dtype = torch.float64) -> Hyper:
        """Per symmetry group g the hyperparameters of param_groups[index[g]], as tensors [G] on index.device.

        Reads the optimizer's current values (call it at every step to follow schedules). A tensor lr (as
        torch allows) is gathered on device without a host synchronisation.
        """
        device = index.device
        vals: dict[str, Tensor] = {}
        for name in (*_FLOAT_FIELDS, *_BOOL_FIELDS):
            dt = torch.bool if name in _BOOL_FIELDS else dtype
            raw = [pg.get(name, False if name in _BOOL_FIELDS else 0.0) for pg in param_groups]
            if any(isinstance(r, Tensor) for r in raw):
                table = torch.stack([torch.as_tensor(r).reshape(()).to(device=device, dtype=dt) for r in raw])
            else:
                table = _filled([bool(r) if dt == torch.bool else float(r) for r in raw], dt, device)
            vals[name] = table.index_select(0, index)
        return cls(**vals)

    def to_dict(self) -> dict[str, Any]:
        """The fields as they are (tensors or numbers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
