"""Where the groups' members sit in `optimizer.param_groups`, and the checks that take a group out of the theory.

The recurrences assume one set of hyperparameters per symmetry group and that every member is updated every
step. Three things break that, and each flags the groups concerned (NaN predictions, `valid=False`, the reason
in the run's manifest) instead of mispredicting them:

* a member parameter that is not in the optimizer (never updated)                    -> `ParamGroupIndex.missing`
* a member without a gradient in some step (torch skips it)                          -> `missing_gradients`
* members in param groups whose hyperparameters differ (at that step: schedules may) -> `mixed_hyperparameters`

Hyperparameters are read from the param groups at every step (any scheduler works) as `values`: one tuple per
param group of the strategy's `hyper_keys`; `HyperReader` turns them into per-group `Hyper` tensors, cached while
the values do not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.theory.hyper import Hyper
from neural_mechanics.tracking.families import ChargeFamily

__all__ = ["HYPER_KEYS", "HyperReader", "Invalidation", "ParamGroupIndex", "missing_gradients",
           "mixed_hyperparameters", "read_values"]

HYPER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
"""The hyperparameters whose values must agree across a group's param groups (torch.optim.SGD's knobs)."""
_FLAGS = ("nesterov", "maximize")

Values = list[tuple[Any, ...]]
Invalidation = tuple[list[int], str]
"""(group ids of one family, the reason) for groups that leave the theory."""


def read_values(optimizer: torch.optim.Optimizer, keys: Sequence[str] = HYPER_KEYS) -> Values:
    """Per param group, the current values of `keys` (missing: False for flags, 0.0 otherwise)."""
    return [tuple(pg.get(k, False if k in _FLAGS else 0.0) for k in keys) for pg in optimizer.param_groups]


class ParamGroupIndex:
    """For one family: the param group(s) of each group's members, built once from the optimizer."""

    def __init__(self, family: ChargeFamily, params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer):
        pg_of = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
        first: list[int] = []
        self.sets: list[tuple[int, ...]] = []
        """Per group: the sorted param groups its members sit in."""
        self.missing: list[Invalidation] = []
        """Groups with a member that is not in the optimizer, one entry per group."""
        for gid, s in enumerate(family.syms):
            pgs = [pg_of.get(id(params[m.param])) for m in s.members]
            absent = [m.param for m, g in zip(s.members, pgs, strict=True) if g is None]
            if absent:
                self.missing.append(([gid], f"member parameter {absent[0]!r} is not in the optimizer (never updated)"))
            known = [g for g in pgs if g is not None]
            first.append(known[0] if known else 0)
            self.sets.append(tuple(sorted(set(known))))
        self.first: Tensor = torch.tensor(first, dtype=torch.long, device=family.device)
        """long [n]: the param group whose hyperparameters each group follows (its first member's)."""
        self.multi: dict[tuple[int, ...], list[int]] = {}
        """Param-group sets of more than one param group -> the groups whose members span them."""
        for gid, st in enumerate(self.sets):
            if len(st) > 1:
                self.multi.setdefault(st, []).append(gid)
        self.touch: dict[str, list[int]] = {}
        """Parameter name -> the groups with a member in it."""
        for gid, s in enumerate(family.syms):
            for name in dict.fromkeys(m.param for m in s.members):
                self.touch.setdefault(name, []).append(gid)
        self.pgs: list[int] = sorted({pg_of[id(params[n])] for n in family.table.params if id(params[n]) in pg_of})
        """The param groups holding any of the family's parameters."""


def missing_gradients(index: ParamGroupIndex, params: Mapping[str, nn.Parameter], step: int) -> list[Invalidation]:
    """Groups with a member parameter whose gradient is None at this step (torch.optim skips such parameters)."""
    return [(gids, f"member parameter {name!r} got no gradient at step {step}")
            for name, gids in index.touch.items() if params[name].grad is None]


def mixed_hyperparameters(index: ParamGroupIndex, values: Values, keys: Sequence[str], step: int
                          ) -> list[Invalidation]:
    """Groups whose members sit in param groups with different values of some of `keys` at this step."""
    out: list[Invalidation] = []
    for st, gids in index.multi.items():
        rows = [values[i] for i in st]
        if any(r != rows[0] for r in rows[1:]):
            diff = [k for j, k in enumerate(keys) if any(r[j] != rows[0][j] for r in rows)]
            out.append((gids, f"members sit in param groups {list(st)} with different {', '.join(diff)} "
                              f"at step {step}"))
    return out


class HyperReader:
    """Per family, `Hyper` [G] gathered from the param groups through `ParamGroupIndex.first`.

    Cached while the values do not change; a tensor-valued hyperparameter (torch allows a tensor lr) is gathered
    on the device without a host synchronisation, and never cached (it may change in place).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, indexes: Sequence[ParamGroupIndex]):
        self.optimizer = optimizer
        self.indexes = list(indexes)
        self._cache: tuple[Any, list[Hyper]] | None = None

    @staticmethod
    def key(values: Values) -> tuple[Any, ...] | None:
        """A hashable cache key of the values, None when some value is a tensor (tuples such as Adam's betas and
        strings such as Muon's adjust_lr_fn are kept as they are)."""

        def hashable(v: Any) -> Any:
            if isinstance(v, Tensor):
                raise TypeError
            if isinstance(v, (tuple, list)):
                return tuple(hashable(x) for x in v)
            return v if v is None or isinstance(v, str) else float(v)

        try:
            return tuple(tuple(hashable(v) for v in row) for row in values)
        except TypeError:
            return None

    def __call__(self, values: Values) -> list[Hyper]:
        key = self.key(values)
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        out = [Hyper.from_param_groups(self.optimizer.param_groups, ix.first) for ix in self.indexes]
        if key is not None:
            self._cache = (key, out)
        return out
