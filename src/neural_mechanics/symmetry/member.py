"""What one group member is: a slice of one parameter tensor (`Member`), and how index lists are written.

A `Member` selects a slice of one parameter tensor, by the name `model.named_parameters()` gives it:
`dim`/`index` pick `index` along `dim` (both None = the whole tensor), and `role` marks A1 ("in",
sign +1) and A2 ("out", sign -1) of a rescale group. Its JSON form (docs/contract.md):

    {"param": "features.0.weight", "dim": 0, "index": [3], "role": null}

A member may carry a second restriction, `sub_dim`/`sub_index` (JSON key `"sub": {"dim": 1, "index":
[2]}`, written only when set), selecting the block `param[index along dim] & [sub_index along sub_dim]`.
Grouped convolutions need it: input channel k = g * (C_in / groups) + l of a conv with groups > 1 is
read by `weight[o in group g, l, :, :]`, a 2-D block that one (dim, index) cannot express.

groups.py builds `Symmetry` (a kind plus members) and `SymmetrySet` on top of this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["Member", "Params", "Role", "short_index", "singletons"]

Role = Literal["in", "out"]
Params = Mapping[str, Tensor]


@dataclass(frozen=True, slots=True)
class Member:
    """A slice of one parameter: `param.index_select(dim, index)`, or the whole tensor."""

    param: str
    dim: int | None = None
    index: tuple[int, ...] | None = None
    role: Role | None = None
    sub_dim: int | None = None
    """Optional second restriction (a block): also `index_select(sub_dim, sub_index)`; needs `dim`."""
    sub_index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.dim is None) != (self.index is None):
            raise ValueError(f"member of {self.param!r}: dim and index must both be set or both be null")
        if self.index is not None and not isinstance(self.index, tuple):
            object.__setattr__(self, "index", tuple(int(i) for i in self.index))
        if self.role not in (None, "in", "out"):
            raise ValueError(f"member of {self.param!r}: role must be 'in', 'out' or null, got {self.role!r}")
        if (self.sub_dim is None) != (self.sub_index is None):
            raise ValueError(f"member of {self.param!r}: sub_dim and sub_index must both be set or both be null")
        if self.sub_index is not None:
            if self.dim is None:
                raise ValueError(f"member of {self.param!r}: a sub restriction needs dim/index as well")
            if not isinstance(self.sub_index, tuple):
                object.__setattr__(self, "sub_index", tuple(int(i) for i in self.sub_index))

    @classmethod
    def trusted(cls, param: str, dim: int | None, index: tuple[int, ...] | None, role: Role | None,
                sub_dim: int | None = None, sub_index: tuple[int, ...] | None = None) -> Member:
        """The same member as `Member(...)`, built without `__post_init__`'s checks: for callers whose values are
        valid by construction (int tuples, a valid role; `find_symmetries` builds ~100k members per model)."""
        m = object.__new__(cls)
        set_param, set_dim, set_index, set_role, set_sub_dim, set_sub_index = _MEMBER_SETTERS
        set_param(m, param)
        set_dim(m, dim)
        set_index(m, index)
        set_role(m, role)
        set_sub_dim(m, sub_dim)
        set_sub_index(m, sub_index)
        return m

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # pickle / copy through the checked constructor
        return Member, (self.param, self.dim, self.index, self.role, self.sub_dim, self.sub_index)

    def _sub_dim(self, ndim: int) -> int | None:
        return None if self.sub_dim is None else self.sub_dim % ndim

    @property
    def sign(self) -> float:
        """+1 for A1 (and for unsigned kinds), -1 for A2 ("out") of a rescale group."""
        return -1.0 if self.role == "out" else 1.0

    def mask(self, like: Tensor) -> Tensor:
        """Boolean tensor shaped like `like`, True on the selected coordinates."""
        m = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        if self.dim is None:
            m.fill_(True)
            return m
        assert self.index is not None
        idx = torch.tensor(self.index, dtype=torch.long, device=like.device)
        m.index_fill_(self.dim, idx, True)
        sub = self._sub_dim(like.ndim)
        if sub is not None:
            assert self.sub_index is not None
            keep = torch.zeros(like.shape[sub], dtype=torch.bool, device=like.device)
            keep[torch.tensor(self.sub_index, dtype=torch.long, device=like.device)] = True
            view = [1] * like.ndim
            view[sub] = like.shape[sub]
            m &= keep.view(view)
        return m

    def numel(self, like: Tensor) -> int:
        """Number of selected coordinates (an index listed twice counts once)."""
        if self.dim is None:
            return like.numel()
        assert self.index is not None
        n = like.numel() // like.shape[self.dim] * len(set(self.index))
        sub = self._sub_dim(like.ndim)
        if sub is not None and sub != self.dim % like.ndim:
            assert self.sub_index is not None
            n = n // like.shape[sub] * len(set(self.sub_index))
        elif sub is not None:
            n = like.numel() // like.shape[sub] * len(set(self.index) & set(self.sub_index or ()))
        return n

    def check(self, params: Params) -> None:
        """Raise a ValueError that says what is wrong if this member does not fit `params`."""
        if self.param not in params:
            raise ValueError(f"member names parameter {self.param!r}, which the model does not have")
        if self.dim is None:
            return
        t = params[self.param]
        if not -t.ndim <= self.dim < t.ndim:
            raise ValueError(f"member of {self.param!r}: dim {self.dim} out of range for shape {tuple(t.shape)}")
        assert self.index is not None
        bad = [i for i in self.index if not 0 <= i < t.shape[self.dim]]
        if bad:
            raise ValueError(f"member of {self.param!r}: index {bad[:5]} out of range along dim {self.dim}")
        if self.sub_dim is None:
            return
        if not -t.ndim <= self.sub_dim < t.ndim:
            raise ValueError(f"member of {self.param!r}: sub dim {self.sub_dim} out of range for shape "
                             f"{tuple(t.shape)}")
        assert self.sub_index is not None
        bad = [i for i in self.sub_index if not 0 <= i < t.shape[self.sub_dim]]
        if bad:
            raise ValueError(f"member of {self.param!r}: sub index {bad[:5]} out of range along dim {self.sub_dim}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract {"param", "dim", "index", "role"}, plus "sub": {"dim", "index"} for a block."""
        d: dict[str, Any] = {
            "param": self.param,
            "dim": self.dim,
            "index": None if self.index is None else list(self.index),
            "role": self.role,
        }
        if self.sub_dim is not None:
            d["sub"] = {"dim": self.sub_dim, "index": list(self.sub_index or ())}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Member:
        index = d.get("index")
        sub = d.get("sub") or None
        return cls(
            param=str(d["param"]),
            dim=None if d.get("dim") is None else int(d["dim"]),
            index=None if index is None else tuple(int(i) for i in index),
            role=d.get("role"),
            sub_dim=None if sub is None else int(sub["dim"]),
            sub_index=None if sub is None else tuple(int(i) for i in sub["index"]),
        )

    def describe(self) -> str:
        sel = "" if self.dim is None else f"[dim {self.dim}: {short_index(self.index)}"
        if self.sub_dim is not None:
            sel += f"; dim {self.sub_dim}: {short_index(self.sub_index)}"
        sel += "" if self.dim is None else "]"
        role = "" if self.role is None else f" ({'A1' if self.role == 'in' else 'A2'})"
        return f"{self.param}{sel}{role}"


def short_index(index: tuple[int, ...] | None) -> str:
    if index is None:
        return "all"
    if len(index) > 1 and list(index) == list(range(index[0], index[0] + len(index))):
        return f"{index[0]}:{index[-1] + 1}"
    if len(index) <= 6:
        return ",".join(map(str, index))
    return ",".join(map(str, index[:3])) + f",...({len(index)} indices)"


_MEMBER_SETTERS = tuple(getattr(Member, f.name).__set__ for f in fields(Member))
"""The slot descriptors' setters, in field order: how `Member.trusted` fills a frozen, slotted instance (as fast
as filling a `__dict__`, with one object per member instead of two)."""


_SINGLETONS: list[tuple[int]] = []


def singletons(n: int) -> list[tuple[int]]:
    """[(0,), (1,), ..., (n-1,)]: one shared index tuple per channel index for the whole process.

    The op rules record ~1e5 one-index slices per model (`Contribution.index`, then `Member.index`); sharing the
    tuples keeps that many objects out of every detection's allocations and out of the collector's passes.
    """
    if len(_SINGLETONS) < n:
        _SINGLETONS.extend((i,) for i in range(len(_SINGLETONS), n))
    return _SINGLETONS[:n]
