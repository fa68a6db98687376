"""Compiled group incidence and vectorised segment sums: per-group <x, D y> without a loop over groups.

The tracker needs, every optimizer step, a handful of per-group bilinear forms such as
B_k = <D theta_k, g_k> or U_k = <u_k, D u_k> for thousands of groups (one per channel of every layer).
Looping over groups in Python (or building dense masks per group) costs a kernel launch per group and
per quantity; instead a `SymmetrySet` is compiled once into an incidence table:

* every member slice of a parameter is addressed by a *cell* of that parameter reduced onto its
  slicing dims (`key`): key () is the whole tensor (one cell), key (d,) has `shape[d]` cells (one per
  slice along d), and a group whose members slice one parameter along several dims (d1, d2, ...) gets
  key (d1, d2, ...) with one cell per entry of the joint table (the union of its members depends only
  on those coordinates);
* the table lists triples (cell, group id, sign) with sign = D = +1 on A / A1 and -1 on A2.

A per-group sum of an elementwise product P = x * y (or of x alone for linear charges) is then

    per_cell[key] = P.sum(dims not in key, dtype=float64)          # one reduction per (param, key)
    out.index_add_(1, group, per_cell[:, cell] * sign)               # one scatter for everything

with every cell vector of every parameter concatenated so that a single `index_add_` serves all groups
and several quantities at once. Overlapping membership (an entry in a scale and in a rescale group,
or in dim 0 of one group and dim 1 of another) needs nothing special: each group owns its own triples.
The cells inside one group are unions, matching `Symmetry.masks()` (an index listed twice counts once).
Nothing here synchronises with the host: the index tensors live on the parameters' device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.groups import Symmetry

Key = tuple[int, ...]


@dataclass
class _Entry:
    """One (parameter, key) reduction: where its cells start in the concatenated cell vector."""

    param: str
    key: Key
    n_cells: int
    offset: int


@dataclass
class SegmentTable:
    """Incidence of a list of groups (ids 0..n_groups-1) on parameter cells; see the module docstring."""

    n_groups: int
    entries: list[_Entry]
    cell: Tensor
    """long [nnz]: index into the concatenated cell vector."""
    group: Tensor
    """long [nnz]: group id of the triple."""
    sign: Tensor
    """float64 [nnz]: D on that cell (+1 or -1)."""
    total_cells: int
    by_param: dict[str, list[_Entry]] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        """Names of the parameters this table touches, in first-use order."""
        return list(self.by_param)

    def to(self, device: torch.device | str) -> SegmentTable:
        return SegmentTable(self.n_groups, self.entries, self.cell.to(device), self.group.to(device),
                            self.sign.to(device), self.total_cells, self.by_param)

    # ---- per-cell reductions --------------------------------------------------------------------
    def cells(self, products: Callable[[str], Sequence[Tensor | None]], n: int, device: torch.device,
              dtype: torch.dtype = torch.float64) -> Tensor:
        """[n, total_cells] float64: for each quantity q, the sum of products(param)[q] over every cell.

        `products(name)` returns n tensors shaped like the parameter (None = identically zero). Each
        product is computed once per parameter and reduced onto every key that parameter is sliced by.
        """
        out = torch.zeros((n, self.total_cells), dtype=dtype, device=device)
        for name, entries in self.by_param.items():
            prods = products(name)
            for q, prod in enumerate(prods):
                if prod is None:
                    continue
                for e in entries:
                    out[q, e.offset:e.offset + e.n_cells] = reduce_onto(prod, e.key, dtype)
        return out

    def segment_sum(self, cells: Tensor, signed: bool = True) -> Tensor:
        """[n, n_groups]: out[q, g] = sum over the triples (c, g, s) of s * cells[q, c] (s -> |s| if not signed)."""
        vals = cells.index_select(1, self.cell)
        if signed:
            vals = vals * self.sign
        out = torch.zeros((cells.shape[0], self.n_groups), dtype=cells.dtype, device=cells.device)
        out.index_add_(1, self.group, vals)
        return out

    def group_sums(self, products: Callable[[str], Sequence[Tensor | None]], n: int, device: torch.device,
                   signed: bool = True) -> Tensor:
        """[n, n_groups] float64 per-group sums <x, D y> (or <x, |D| y> when not signed)."""
        return self.segment_sum(self.cells(products, n, device), signed=signed)


def reduce_onto(t: Tensor, key: Key, dtype: torch.dtype = torch.float64) -> Tensor:
    """Flattened table sum_{other dims} t over the dims in `key` (sorted), accumulated in `dtype`.

    key () -> shape [1] (the whole sum); key = all dims -> t itself, flattened.
    """
    if not key:
        return t.sum(dtype=dtype).reshape(1)
    other = [d for d in range(t.ndim) if d not in key]
    if not other:
        return t.to(dtype).reshape(-1)
    return t.sum(dim=other, dtype=dtype).reshape(-1)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def compile_segments(symmetries: Sequence[Symmetry], shapes: Mapping[str, torch.Size | Sequence[int]],
                     device: torch.device | str = "cpu") -> SegmentTable:
    """Compile groups (ids = position in `symmetries`) into a `SegmentTable` on `device`.

    `shapes` maps every member's parameter name to the parameter's shape. Raises TrackerError when a
    member does not fit its parameter or when A1 and A2 of a rescale group overlap.
    """
    # (param, key) -> list of (cell, group, sign)
    triples: dict[tuple[str, Key], list[tuple[int, int, float]]] = {}
    for gid, sym in enumerate(symmetries):
        per_param: dict[str, list] = {}
        for m in sym.members:
            if m.param not in shapes:
                raise TrackerError(f"symmetry {sym.name!r} names parameter {m.param!r}, which the model does not have",
                                   "pass the SymmetrySet found on this model (names as in model.named_parameters())")
            per_param.setdefault(m.param, []).append(m)
        for pname, members in per_param.items():
            shape = tuple(shapes[pname])
            ndim = len(shape)
            for m in members:
                if m.dim is not None:
                    if not -ndim <= m.dim < ndim:
                        raise TrackerError(f"symmetry {sym.name!r}: dim {m.dim} out of range for {pname!r} "
                                           f"of shape {shape}", "fix or re-detect the symmetry set")
                    bad = [i for i in (m.index or ()) if not 0 <= i < shape[_norm_dim(m.dim, ndim)]]
                    if bad:
                        raise TrackerError(f"symmetry {sym.name!r}: index {bad[:5]} out of range for {pname!r} "
                                           f"of shape {shape} along dim {m.dim}", "fix or re-detect the symmetry set")
            signs = {m.sign for m in members}
            dims = {None if m.dim is None else _norm_dim(m.dim, ndim) for m in members}
            if None in dims or len(dims) > 1:
                if len(signs) > 1:
                    raise TrackerError(f"rescale symmetry {sym.name!r}: A1 and A2 overlap in {pname!r}",
                                       "A1 and A2 of one group must be disjoint")
                sign = signs.pop()
                if None in dims:
                    triples.setdefault((pname, ()), []).append((0, gid, sign))
                    continue
                key = tuple(sorted(d for d in dims if d is not None))
                table = torch.zeros([shape[d] for d in key], dtype=torch.bool)
                for m in members:
                    assert m.dim is not None and m.index is not None
                    pos = key.index(_norm_dim(m.dim, ndim))
                    table.index_fill_(pos, torch.tensor(sorted(set(m.index)), dtype=torch.long), True)
                for c in table.reshape(-1).nonzero().flatten().tolist():
                    triples.setdefault((pname, key), []).append((c, gid, sign))
                continue
            (d,) = dims
            assert d is not None
            owner: dict[int, float] = {}
            for m in members:
                assert m.index is not None
                for i in m.index:
                    if owner.setdefault(i, m.sign) != m.sign:
                        raise TrackerError(f"rescale symmetry {sym.name!r}: A1 and A2 overlap in {pname!r}",
                                           "A1 and A2 of one group must be disjoint")
            lst = triples.setdefault((pname, (d,)), [])
            lst.extend((i, gid, s) for i, s in sorted(owner.items()))

    entries: list[_Entry] = []
    by_param: dict[str, list[_Entry]] = {}
    cells: list[int] = []
    groups: list[int] = []
    sign_list: list[float] = []
    offset = 0
    for (pname, key), lst in triples.items():
        shape = tuple(shapes[pname])
        n_cells = 1
        for d in key:
            n_cells *= shape[d]
        e = _Entry(pname, key, n_cells, offset)
        entries.append(e)
        by_param.setdefault(pname, []).append(e)
        for c, g, s in lst:
            cells.append(offset + c)
            groups.append(g)
            sign_list.append(s)
        offset += n_cells
    return SegmentTable(
        n_groups=len(symmetries),
        entries=entries,
        cell=torch.tensor(cells, dtype=torch.long, device=device),
        group=torch.tensor(groups, dtype=torch.long, device=device),
        sign=torch.tensor(sign_list, dtype=torch.float64, device=device),
        total_cells=offset,
        by_param=by_param,
    )
