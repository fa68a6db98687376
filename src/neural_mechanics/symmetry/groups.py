"""What one symmetry group is: members (parameter slices), its action, generator and charge.

A `Member` selects a slice of one parameter tensor, by the name `model.named_parameters()` gives it:
`dim`/`index` pick `index` along `dim` (both None = the whole tensor), and `role` marks A1 ("in",
sign +1) and A2 ("out", sign -1) of a rescale group. A `Symmetry` is a kind plus members; a
`SymmetrySet` is what `find_symmetries` returns. The JSON form is the public contract in docs/contract.md:

    {"kind": "scale", "name": "...", "members": [{"param": "features.0.weight", "dim": 0,
     "index": [3], "role": null}, ...], "layer": "...", "chain": [...]}

(`layer` and `chain` are extensions; readers must ignore keys they do not know.)

A member may carry a second restriction, `sub_dim`/`sub_index` (JSON key `"sub": {"dim": 1, "index":
[2]}`, written only when set), selecting the block `param[index along dim] & [sub_index along sub_dim]`.
Grouped convolutions need it: input channel k = g * (C_in / groups) + l of a conv with groups > 1 is
read by `weight[o in group g, l, :, :]`, a 2-D block that one (dim, index) cannot express.

The action, generator and charge here are the single reference implementation used by
certification, constraint checks and the brute-force tracker: they are written for clarity
(dense masks), not speed. The streaming tracker compiles groups into segment reductions instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

from .coverage import coverage_lines, empty_message
from .kinds import KINDS, get_kind

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
        m = _new(cls)
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
        sel = "" if self.dim is None else f"[dim {self.dim}: {_short_index(self.index)}"
        if self.sub_dim is not None:
            sel += f"; dim {self.sub_dim}: {_short_index(self.sub_index)}"
        sel += "" if self.dim is None else "]"
        role = "" if self.role is None else f" ({'A1' if self.role == 'in' else 'A2'})"
        return f"{self.param}{sel}{role}"


def _short_index(index: tuple[int, ...] | None) -> str:
    if index is None:
        return "all"
    if len(index) > 1 and list(index) == list(range(index[0], index[0] + len(index))):
        return f"{index[0]}:{index[-1] + 1}"
    if len(index) <= 6:
        return ",".join(map(str, index))
    return ",".join(map(str, index[:3])) + f",...({len(index)} indices)"


@dataclass(frozen=True, slots=True)
class Symmetry:
    """One symmetry group: a kind, a unique name and the parameter slices it acts on."""

    kind: str
    name: str
    members: tuple[Member, ...]
    layer: str = ""
    """The layer (module path) this group is reported under in per-layer aggregates."""
    chain: tuple[str, ...] = field(default=(), compare=False)
    """The operations that tie the members together, as found in the graph (for `.details()`)."""

    def __post_init__(self) -> None:
        get_kind(self.kind)
        if not isinstance(self.members, tuple):
            object.__setattr__(self, "members", tuple(self.members))
        if not isinstance(self.chain, tuple):
            object.__setattr__(self, "chain", tuple(self.chain))
        if not self.members:
            raise ValueError(f"symmetry {self.name!r} has no members")
        if KINDS[self.kind].signed_roles:
            roles = {m.role for m in self.members}
            if not roles <= {"in", "out"} or "in" not in roles:
                raise ValueError(f"rescale symmetry {self.name!r} needs members with role 'in' (and 'out')")
        if not self.layer:
            object.__setattr__(self, "layer", self.members[0].param.rpartition(".")[0])

    @classmethod
    def trusted(cls, kind: str, name: str, members: tuple[Member, ...], layer: str, chain: tuple[str, ...]) -> Symmetry:
        """The same group as `Symmetry(...)`, built without `__post_init__`'s checks: for callers whose values are
        valid by construction (a known kind, tuples, a layer, A1 members for a rescale group)."""
        s = _new(cls)
        set_kind, set_name, set_members, set_layer, set_chain = _SYMMETRY_SETTERS
        set_kind(s, kind)
        set_name(s, name)
        set_members(s, members)
        set_layer(s, layer)
        set_chain(s, chain)
        return s

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # pickle / copy through the checked constructor
        return Symmetry, (self.kind, self.name, self.members, self.layer, self.chain)

    # ---- reference (dense) mathematics -------------------------------------------------------
    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters this group touches, in order of first appearance."""
        return tuple(dict.fromkeys(m.param for m in self.members))

    def check(self, params: Params) -> None:
        """Validate the members against a parameter dict (names, dims, indices, A1/A2 overlap)."""
        for m in self.members:
            m.check(params)
        if KINDS[self.kind].signed_roles:
            for name in self.params:
                masks = {r: torch.zeros_like(params[name], dtype=torch.bool) for r in ("in", "out")}
                for m in self.members:
                    if m.param == name and m.role is not None:
                        masks[m.role] |= m.mask(params[name])
                if (masks["in"] & masks["out"]).any():
                    raise ValueError(f"rescale symmetry {self.name!r}: A1 and A2 overlap in {name!r}")

    def masks(self, params: Params) -> dict[str, Tensor]:
        """Per parameter, the float tensor D (+1 on A / A1, -1 on A2, 0 elsewhere)."""
        out: dict[str, Tensor] = {}
        for m in self.members:
            p = params[m.param]
            d = out.setdefault(m.param, torch.zeros_like(p))
            d[m.mask(p)] = m.sign
        return out

    def generator(self, params: Params) -> dict[str, Tensor]:
        """xi(theta): 1_A (translation), theta_A (scale), theta_A1 - theta_A2 (rescale)."""
        masks = self.masks(params)
        if KINDS[self.kind].quadratic:
            return {k: d * params[k] for k, d in masks.items()}
        return masks

    def charge(self, params: Params) -> Tensor:
        """T = <theta, 1_A> (linear) or C = <theta, D theta> (quadratic), in float64."""
        total = torch.zeros((), dtype=torch.float64)
        quadratic = KINDS[self.kind].quadratic
        for k, d in self.masks(params).items():
            p = params[k].detach().to(torch.float64)
            term = (d.to(torch.float64) * p * p).sum() if quadratic else (d.to(torch.float64) * p).sum()
            total = total + term.cpu()
        return total

    def act(self, params: Params, alpha: float) -> dict[str, Tensor]:
        """psi(theta, alpha) for the touched parameters, out of place.

        translation: theta + alpha on A; scale: alpha theta on A (alpha > 0);
        rescale: alpha theta on A1 and theta / alpha on A2 (alpha > 0).
        """
        if self.kind != "translation" and alpha <= 0:
            raise ValueError(f"{self.kind} actions need alpha > 0, got {alpha}")
        out: dict[str, Tensor] = {}
        for k, d in self.masks(params).items():
            p = params[k]
            if self.kind == "translation":
                out[k] = p + alpha * d
            else:
                factor = torch.ones_like(p)
                factor[d > 0] = alpha
                factor[d < 0] = 1.0 / alpha
                out[k] = p * factor
        return out

    # ---- presentation and serialisation ------------------------------------------------------
    def details(self) -> str:
        """A readable account: kind, members and the chain of operations that ties them."""
        kind = KINDS[self.kind]
        lines = [f"{self.kind} symmetry {self.name!r} (layer {self.layer})",
                 f"  action {kind.action}; conserved under gradient flow: {kind.charge}",
                 "  members:"]
        lines += [f"    {m.describe()}" for m in self.members]
        if self.chain:
            lines.append("  why (operations tying the members):")
            lines += [f"    {step}" for step in self.chain]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "members": [m.to_dict() for m in self.members],
            "layer": self.layer,
            "chain": list(self.chain),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Symmetry:
        return cls(
            kind=str(d["kind"]),
            name=str(d["name"]),
            members=tuple(Member.from_dict(m) for m in d["members"]),
            layer=str(d.get("layer") or ""),
            chain=tuple(d.get("chain") or ()),
        )


_new = object.__new__
_MEMBER_SETTERS = tuple(getattr(Member, f.name).__set__ for f in fields(Member))
_SYMMETRY_SETTERS = tuple(getattr(Symmetry, f.name).__set__ for f in fields(Symmetry))
"""The slot descriptors' setters, in field order: how the `trusted` constructors fill a frozen, slotted instance
(as fast as filling a `__dict__`, with one object per member instead of two)."""


class SymmetrySet(Sequence[Symmetry]):
    """An ordered, name-indexed collection of symmetries (what `find_symmetries` returns)."""

    def __init__(self, symmetries: Iterable[Symmetry] = (), meta: Mapping[str, Any] | None = None):
        self._items: tuple[Symmetry, ...] = tuple(symmetries)
        self._by_name: dict[str, Symmetry] = {}
        for s in self._items:
            if s.name in self._by_name:
                raise ValueError(f"duplicate symmetry name {s.name!r}")
            self._by_name[s.name] = s
        self.meta: dict[str, Any] = dict(meta or {})
        """Free-form facts about how the set was found (model, input shape, loss, warnings)."""

    # Sequence protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Symmetry]:
        return iter(self._items)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"no symmetry named {key!r}") from None
        if isinstance(key, slice):
            return SymmetrySet(self._items[key], self.meta)
        return self._items[key]

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._by_name
        return item in self._items

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return f"SymmetrySet({len(self)} groups: {counts})"

    # Queries -----------------------------------------------------------------------------------
    def filter(self, kind: str | None = None, layer: str | None = None) -> SymmetrySet:
        """The sub-set of one kind and/or one layer."""
        if kind is not None:
            get_kind(kind)
        return SymmetrySet(
            (s for s in self if (kind is None or s.kind == kind) and (layer is None or s.layer == layer)),
            self.meta,
        )

    def counts(self) -> dict[str, int]:
        """Number of groups per kind (every kind listed, zeros included)."""
        c = Counter(s.kind for s in self)
        return {k: c.get(k, 0) for k in KINDS}

    def counts_by_layer(self) -> dict[tuple[str, str], int]:
        """Number of groups per (layer, kind), in order of first appearance."""
        return dict(Counter((s.layer, s.kind) for s in self))

    def layers(self) -> list[str]:
        return list(dict.fromkeys(s.layer for s in self))

    def details(self) -> str:
        """A per-layer table of group counts, then the coverage block of `meta["coverage"]` (symmetry/coverage.py):
        the fraction of parameter entries in groups and the ops that blocked the rest."""
        rows = [f"{'layer':<40} {'translation':>11} {'scale':>7} {'rescale':>8}"]
        by_layer = self.counts_by_layer()
        for layer in self.layers():
            cells = [by_layer.get((layer, k), 0) for k in KINDS]
            rows.append(f"{layer:<40} {cells[0]:>11} {cells[1]:>7} {cells[2]:>8}")
        total = self.counts()
        rows.append(f"{'total':<40} {total['translation']:>11} {total['scale']:>7} {total['rescale']:>8}")
        if not len(self) and "coverage" in self.meta:
            rows.append(empty_message(self.meta))
        rows += coverage_lines(self.meta)
        return "\n".join(rows)

    # Serialisation -----------------------------------------------------------------------------
    def to_json(self, indent: int | None = None, *, with_meta: bool = False) -> str:
        """The JSON list of symmetries (the contract in docs/contract.md); with_meta=True: the object
        {"symmetries": [...], "meta": {...}} (what `nmech symmetries --json-full` prints; `from_json` reads both)."""
        items = [s.to_dict() for s in self]
        if with_meta:
            return json.dumps({"symmetries": items, "meta": self.meta}, indent=indent, default=str)
        return json.dumps(items, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SymmetrySet:
        """Read `to_json` output back (also accepts {"symmetries": [...], "meta": {...}})."""
        data = json.loads(text)
        meta: dict[str, Any] = {}
        if isinstance(data, dict):
            meta = dict(data.get("meta") or {})
            data = data.get("symmetries")
        if not isinstance(data, list):
            raise ValueError("symmetry JSON must be a list of symmetries (or an object with 'symmetries')")
        return cls((Symmetry.from_dict(d) for d in data), meta)
