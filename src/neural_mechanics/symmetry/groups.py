"""What one symmetry group is: members (parameter slices), its action, generator and charge.

A `Member` (member.py, re-exported here) selects a slice of one parameter tensor, by the name
`model.named_parameters()` gives it; `role` marks A1 ("in", sign +1) and A2 ("out", sign -1) of a rescale
group. A `Symmetry` is a kind plus members; a
`SymmetrySet` is what `find_symmetries` returns. The JSON form is the public contract in docs/contract.md:

    {"kind": "scale", "name": "...", "members": [{"param": "features.0.weight", "dim": 0,
     "index": [3], "role": null}, ...], "layer": "...", "chain": [...]}

(`layer` and `chain` are extensions; readers must ignore keys they do not know; a member's optional block
restriction is written as `"sub": {"dim": 1, "index": [2]}`, see member.py.)

The action, generator and charge here are the single reference implementation used by
certification, constraint checks and the brute-force tracker: they are written for clarity
(dense masks), not speed. The streaming tracker compiles groups into segment reductions instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .coverage import coverage_lines, empty_message
from .kinds import KINDS, get_kind
from .member import Member, Params, Role, short_index

__all__ = ["Member", "Params", "Role", "Symmetry", "SymmetrySet", "short_index"]



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
        s = object.__new__(cls)
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


_SYMMETRY_SETTERS = tuple(getattr(Symmetry, f.name).__set__ for f in fields(Symmetry))
"""The slot descriptors' setters, in field order: how `Symmetry.trusted` fills a frozen, slotted instance."""


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
