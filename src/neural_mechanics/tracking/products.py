"""Per-step measurements declared as data: named per-group sums of products of per-parameter fields.

A strategy says what it needs as `Product` records, e.g. `Product("B", "theta", "grad")` for the breaking term
B = <D theta, g> of a quadratic charge or `Product("norm2", "theta", "theta", signed=False)` for |theta_A|^2;
`reduce_products` forms each distinct product once per parameter, reduces it onto that parameter's cells
(`symmetry/incidence.py`) and sums the cells of every group with D (signed) or |D| (unsigned):

    out[name][i] = sum_{A_i} D_i * left * right        (left alone when right is None; |D_i| when not signed)

Fields are looked up by name per parameter through `Fields`: "theta" (the parameter), "grad" (its gradient),
"abs_theta" (|theta|), and whatever a strategy adds ("buffer" = SGD's momentum buffer, "prev" / "delta" = a copy
of theta_k and theta_k - theta_{k+1}, ...). A field that is None (no gradient, no buffer yet) counts as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.incidence import Factor

__all__ = ["CellTable", "FieldGetter", "Fields", "Product", "reduce_products"]

FieldGetter = Callable[[str], Tensor | None]
"""Parameter name -> the field's tensor for that parameter (None = identically zero)."""


@dataclass(frozen=True)
class Product:
    """One per-group sum: sum over A_i of D_i * left * right (D_i * left when right is None; |D_i| if not signed)."""

    name: str
    left: str
    right: str | None = None
    signed: bool = True


class Fields:
    """The named per-parameter tensors products read: theta, grad, abs_theta, plus `extra` getters."""

    def __init__(self, params: Mapping[str, nn.Parameter], extra: Mapping[str, FieldGetter] | None = None):
        self.params = params
        self.getters: dict[str, FieldGetter] = {
            "theta": lambda name: self.params[name].detach(),
            "grad": lambda name: self.params[name].grad,
            "abs_theta": lambda name: self.params[name].detach().abs(),
            **(extra or {}),
        }

    def get(self, param: str, field: str) -> Tensor | None:
        return self.getters[field](param)


class CellTable(Protocol):
    """What `reduce_products` needs of a segment table: `symmetry.incidence.GroupIncidence` (whole parameters) or
    `tracking.shard_tables.LocalIncidence` (one rank's shards)."""

    def cells(self, factors: Callable[[str], Sequence[Factor]], n: int, dtype: torch.dtype = ...) -> Tensor: ...

    def segment_sum(self, cells: Tensor, signed: bool = True) -> Tensor: ...


def reduce_products(table: CellTable, products: Sequence[Product], fields: Fields) -> dict[str, Tensor]:
    """{product.name: float64 tensor [groups]} for every product; each distinct (left, right) is formed once."""
    if not products:
        return {}
    pairs = list(dict.fromkeys((p.left, p.right) for p in products))

    def factors(name: str) -> list[Factor]:
        seen: dict[str, Tensor | None] = {}
        out: list[Factor] = []
        for left, right in pairs:
            for f in (left, right):
                if f is not None and f not in seen:
                    seen[f] = fields.get(name, f)
            x, y = seen[left], (None if right is None else seen[right])
            out.append(x if right is None else (None if x is None or y is None else (x, y)))
        return out

    cells = table.cells(factors, len(pairs))
    res: dict[str, Tensor] = {}
    for signed in (True, False):
        wanted = [p for p in products if p.signed == signed]
        if not wanted:
            continue
        rows = [pairs.index((p.left, p.right)) for p in wanted]
        # rows picked by slicing, not by an index tensor built from a list (a host-to-device copy on CUDA)
        picked = cells if rows == list(range(len(pairs))) else torch.stack([cells[r] for r in rows])
        sums = table.segment_sum(picked, signed=signed)
        res.update({p.name: sums[i] for i, p in enumerate(wanted)})
    return res
