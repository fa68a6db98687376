"""Compiled group incidence: per-group signed sums of fields (reduce) and per-group coefficients back (expand).

Both the streaming tracker (per step, thousands of groups, float32 training) and the geometry checks
(float64, Hessian probes) need the same two linear maps for a list of groups i with signed masks D_i
(+1 on A / A1, -1 on A2, docs/theory.md section 1):

    reduce(f)[i] = sum_{A_i} D_i f          (|D_i| when unsigned)
    expand(c)    = sum_i c_i D_i            (a parameter-shaped tensor per touched parameter)

A Python loop over groups (or a dense mask per group) costs one kernel launch per group and per
quantity; instead the groups are compiled once into an incidence table over *cells*:

* every member slice of a parameter is addressed by a cell of that parameter reduced onto its slicing
  dims (`key`): key () is the whole tensor (one cell), key (d,) has `shape[d]` cells (one per slice
  along d), and a group whose members slice one parameter along several dims (d1, d2, ...) gets key
  (d1, d2, ...) with one cell per entry of the joint table (the union of its members depends only on
  those coordinates);
* a member with a second restriction (`Member.sub_dim`, the blocks `weight[rows of group g, l]` of
  grouped convolutions) adds its sub dim to the key and marks exactly its block's cells
  (`triples_block`);
* the table lists triples (cell, group, sign) with sign = D on that cell.

Then reduce is "sum each field onto its cells, one `index_add_` for all groups", and expand is "one
`index_add_` of the coefficients onto the cells, then one broadcast add per (parameter, key)". Inside a
group the cells are unions, matching `Symmetry.masks()` (an index listed twice counts once); overlapping
groups (an entry in a scale and a rescale group, or in dim 0 of one group and dim 1 of another) need
nothing special, each group owns its triples. Nothing synchronises with the host: the index tensors
live on the parameters' device.

Cost and accuracy of the cell sums (`block_sums`): the product x * y is formed once per parameter,
reduced in its own dtype onto the finest table its keys need (the union of their dims, at least dim 0),
and every key's cells are then summed from that table. A float32 parameter is never copied to float64
(a float64 sum over a float32 tensor is ~8x slower on CPU than the float32 sum); float32 accumulation
only runs within one cell (one output row, one input column, one 3x3 filter), where torch's cascade
summation keeps the error at a few ulp of the sum of |terms|, and cells are combined in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.kinds import KINDS

Key = tuple[int, ...]
Factor = Tensor | tuple[Tensor, Tensor] | None
"""One quantity of one parameter for `GroupIncidence.cells`: a field, a pair whose product is summed, or None (0)."""

__all__ = ["CellBlock", "Factor", "GroupIncidence", "Key", "block_sums", "fill_cells", "reduce_onto", "segment_sum"]


@dataclass(frozen=True)
class CellBlock:
    """One (parameter, key) table of cells: where it sits in the concatenated cell vector."""

    param: str
    key: Key
    shape: tuple[int, ...]
    """The parameter's shape."""
    n_cells: int
    offset: int

    @property
    def view_shape(self) -> list[int]:
        """The cell table as a broadcastable view of the parameter (size 1 along the dims not in key)."""
        return [n if d in self.key else 1 for d, n in enumerate(self.shape)]

    @property
    def cell_size(self) -> int:
        """Number of parameter entries in one cell: prod of shape[d] over the dims not in key."""
        out = 1
        for d, n in enumerate(self.shape):
            if d not in self.key:
                out *= n
        return out


def reduce_onto(t: Tensor, key: Key, dtype: torch.dtype = torch.float64) -> Tensor:
    """Flattened table sum_{other dims} t over the dims in `key` (sorted), accumulated in `dtype`.

    key () -> shape [1] (the whole sum); key = all dims -> t itself, flattened. (The reference form of
    `block_sums`, which gives the same sums faster for float32 tensors.)
    """
    if not key:
        return t.sum(dtype=dtype).reshape(1)
    other = [d for d in range(t.ndim) if d not in key]
    if not other:
        return t.to(dtype).reshape(-1)
    return t.sum(dim=other, dtype=dtype).reshape(-1)


def block_sums(x: Tensor, y: Tensor | None, keys: Sequence[Key], dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """For P = x * y (or P = x when y is None): [reduce_onto(P, key, dtype) for key in keys].

    P is formed once and summed in its own dtype over the dims outside U = union of the keys' dims (U = (0,)
    when that union is empty): the dims after max(U) are collapsed into one contiguous run (a short run,
    such as the 9 taps of a 3x3 filter, is summed by a matrix-vector product with ones, which is ~5x faster
    on CPU than torch's reduction over a short inner dim), the rest by `sum`. Each key's table is then summed
    from that [shape[d] for d in U] table, still in P's dtype (so every float32 sum runs within one slice,
    with torch's cascade summation), and converted to `dtype`; `GroupIncidence.segment_sum` accumulates the
    slices of a group in float64. Never `sum(dtype=float64)` of a float32 tensor: on CPU that is ~8x slower.
    """
    p = x if y is None else x * y
    if p.ndim == 0:
        return [p.reshape(1).to(dtype) for _ in keys]
    union = sorted({d for k in keys for d in k}) or [0]
    last = union[-1]
    core = p
    if last + 1 < p.ndim:
        r = math.prod(p.shape[last + 1:])
        flat = p.reshape(-1, r)
        if r <= _GEMV_MAX and p.is_floating_point():
            red = flat @ torch.ones(r, dtype=p.dtype, device=p.device)
        else:
            red = flat.sum(-1)
        core = red.reshape(p.shape[:last + 1])
    inner = [d for d in range(last + 1) if d not in union]
    if inner:
        core = core.sum(dim=inner)
    out = []
    for key in keys:
        drop = [j for j, d in enumerate(union) if d not in key]
        t = core.sum(dim=drop) if drop else core
        out.append(t.to(dtype).reshape(-1))
    return out


_GEMV_MAX = 64
"""Longest trailing run summed by a matrix-vector product (BLAS keeps several partial sums: exact enough)."""


def segment_sum(cells: Tensor, cell: Tensor, group: Tensor, sign: Tensor, n: int, signed: bool = True) -> Tensor:
    """[q, n] from cells [q, total] (or [total] -> [n]) and triples (cell, group, sign): out[q, i] = sum over the
    triples (c, i, s) of s * cells[q, c] (|s| = 1 when not signed). One index_select and one index_add_."""
    squeeze = cells.ndim == 1
    cells = cells.reshape(1, -1) if squeeze else cells
    vals = cells.index_select(1, cell)
    if signed:
        vals = vals * sign.to(vals.dtype)
    out = torch.zeros((cells.shape[0], n), dtype=cells.dtype, device=cells.device)
    out.index_add_(1, group, vals)
    return out[0] if squeeze else out


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _shape_of(v: Tensor | torch.Size | Sequence[int]) -> tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, Tensor) else tuple(int(n) for n in v)


def fill_cells(by_param: Mapping[str, Sequence[Any]], total_cells: int, device: torch.device | str,
               factors: Callable[[str], Sequence[Factor]], n: int, dtype: torch.dtype = torch.float64,
               read: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """[n, total_cells]: out[q, b.offset : b.offset + b.n_cells] = the sums of factors(param)[q] (x, or x * y for
    a pair) onto block b's key, for every block b (with .key, .offset, .n_cells) of every parameter in `by_param`.

    `read` maps each factor to the tensor to sum (a rank's local shard, for sharded tables); a factor that reads
    as empty leaves its cells 0 (a sum over no entries).
    """
    out = torch.zeros((n, total_cells), dtype=dtype, device=device)
    for name, blocks in by_param.items():
        keys = [b.key for b in blocks]
        for q, fac in enumerate(factors(name)):
            if fac is None:
                continue
            x, y = fac if isinstance(fac, tuple) else (fac, None)
            if read is not None:
                x, y = read(x), None if y is None else read(y)
            if x.numel() == 0:
                continue
            for b, t in zip(blocks, block_sums(x, y, keys, dtype), strict=True):
                out[q, b.offset:b.offset + b.n_cells] = t
    return out


class GroupIncidence:
    """All groups of a symmetry list (ids = positions) compiled against concrete parameter shapes.

    `shapes` maps every member's parameter name to a tensor (its shape and device are used) or a shape.
    Raises `error` (an NMechError subclass; the tracker passes TrackerError) when a member names a missing
    parameter, has a dim or index out of range, or when A1 and A2 of a rescale group overlap.
    """

    def __init__(self, symmetries: Iterable[Symmetry], shapes: Mapping[str, Tensor | torch.Size | Sequence[int]],
                 device: torch.device | str | None = None, *, error: type[NMechError] = NMechError):
        self.symmetries: list[Symmetry] = list(symmetries)
        self.n = len(self.symmetries)
        if device is None:
            tensors = [v for v in shapes.values() if isinstance(v, Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
        self.device = torch.device(device)
        self.quadratic = torch.tensor([KINDS[s.kind].quadratic for s in self.symmetries], dtype=torch.bool,
                                      device=self.device)
        """bool [n]: True for scale / rescale groups (charge <theta, D theta>), False for translation."""
        triples = _compile(self.symmetries, {k: _shape_of(v) for k, v in shapes.items()}, error)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.blocks: list[CellBlock] = []
        self.by_param: dict[str, list[CellBlock]] = {}
        cells: list[int] = []
        groups: list[int] = []
        signs: list[float] = []
        sizes: list[float] = []
        offset = 0
        for (pname, key), lst in triples.items():
            shape = _shape_of(shapes[pname])
            n_cells = 1
            for d in key:
                n_cells *= shape[d]
            blk = CellBlock(pname, key, shape, n_cells, offset)
            self.shapes[pname] = shape
            self.blocks.append(blk)
            self.by_param.setdefault(pname, []).append(blk)
            for c, g, s in lst:
                cells.append(offset + c)
                groups.append(g)
                signs.append(s)
            sizes.extend([float(blk.cell_size)] * n_cells)
            offset += n_cells
        self.total_cells = offset
        self.cell = torch.tensor(cells, dtype=torch.long, device=self.device)
        """long [nnz]: index into the concatenated cell vector."""
        self.group = torch.tensor(groups, dtype=torch.long, device=self.device)
        """long [nnz]: group id of the triple."""
        self.sign = torch.tensor(signs, dtype=torch.float64, device=self.device)
        """float64 [nnz]: D on that cell (+1 or -1)."""
        self.cell_size = torch.tensor(sizes, dtype=torch.float64, device=self.device)
        """float64 [total_cells]: number of parameter entries in each cell."""

    @property
    def params(self) -> list[str]:
        """Names of the parameters the groups touch, in first-use order."""
        return list(self.by_param)

    def keys(self, name: str) -> list[Key]:
        """The slicing keys of parameter `name` (empty if no group touches it)."""
        return [b.key for b in self.by_param.get(name, [])]

    # ---- reduce -------------------------------------------------------------------------------------
    def cells(self, factors: Callable[[str], Sequence[Factor]], n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """[n, total_cells]: for quantity q, the sum over each cell of factors(param)[q] (x, or x * y for a pair).

        `factors(name)` is called once per touched parameter and returns n items (None = identically zero);
        each product is formed once and reduced onto every key of that parameter (`block_sums`).
        """
        return fill_cells(self.by_param, self.total_cells, self.device, factors, n, dtype)

    def segment_sum(self, cells: Tensor, signed: bool = True) -> Tensor:
        """[q, n]: out[q, i] = sum over the triples (c, i, s) of s * cells[q, c] (|s| = 1 when not signed)."""
        return segment_sum(cells, self.cell, self.group, self.sign, self.n, signed)

    def reduce_many(self, factors: Callable[[str], Sequence[Factor]], n: int, signed: bool = True) -> Tensor:
        """[n, groups] float64: per group sum_{A_i} D_i x y (or |D_i|) for each of the n factors."""
        return self.segment_sum(self.cells(factors, n), signed=signed)

    def reduce(self, fields: Mapping[str, Tensor], signed: bool = True) -> Tensor:
        """(n,) float64: per group sum over A_i of D_i * f (signed) or of f (unsigned); missing fields count 0."""
        return self.reduce_many(lambda name: [fields.get(name)], 1, signed=signed)[0]

    def sizes(self) -> Tensor:
        """|A_i|: the number of parameter entries of each group (float64)."""
        return self.segment_sum(self.cell_size, signed=False)

    # ---- expand -------------------------------------------------------------------------------------
    def expand(self, coef: Tensor, signed: bool = True, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        """Per touched parameter: sum_i coef_i D_i (signed) or sum_i coef_i |D_i| (unsigned), as `dtype`."""
        coef = coef.to(device=self.device, dtype=torch.float64)
        w = coef.index_select(0, self.group)
        if signed:
            w = w * self.sign
        per_cell = torch.zeros(self.total_cells, dtype=torch.float64, device=self.device).index_add_(0, self.cell, w)
        out: dict[str, Tensor] = {}
        for name, blocks in self.by_param.items():
            t = torch.zeros(self.shapes[name], dtype=torch.float64, device=self.device)
            for b in blocks:
                t += per_cell[b.offset:b.offset + b.n_cells].view(b.view_shape)
            out[name] = t.to(dtype)
        return out


def _compile(symmetries: Sequence[Symmetry], shapes: Mapping[str, tuple[int, ...]],
             error: type[NMechError]) -> dict[tuple[str, Key], list[tuple[int, int, float]]]:
    """(param, key) -> [(cell, group, sign)], validating every member."""
    overlap_fix = "a coordinate can be in A1 or in A2 of one group, not both"
    triples: dict[tuple[str, Key], list[tuple[int, int, float]]] = {}
    for gid, sym in enumerate(symmetries):
        per_param: dict[str, list] = {}
        for m in sym.members:
            if m.param not in shapes:
                raise error(f"symmetry {sym.name!r} names parameter {m.param!r}, which the model does not have",
                            "pass the symmetries found on this model (re-run find_symmetries on it; names as in "
                            "model.named_parameters())")
            per_param.setdefault(m.param, []).append(m)
        for pname, members in per_param.items():
            shape = shapes[pname]
            ndim = len(shape)
            for m in members:
                if m.dim is not None:
                    if not -ndim <= m.dim < ndim:
                        raise error(f"symmetry {sym.name!r}: dim {m.dim} out of range for {pname!r} of shape {shape}",
                                    "fix or re-detect the symmetry set")
                    bad = [i for i in (m.index or ()) if not 0 <= i < shape[_norm_dim(m.dim, ndim)]]
                    if bad:
                        raise error(f"symmetry {sym.name!r}: index {bad[:5]} out of range for {pname!r} "
                                    f"of shape {shape} along dim {m.dim}", "fix or re-detect the symmetry set")
            if any(m.sub_dim is not None for m in members) and all(m.dim is not None for m in members):
                triples_block(triples, sym, gid, pname, shape, members, error)
                continue
            signs = {m.sign for m in members}
            dims = {None if m.dim is None else _norm_dim(m.dim, ndim) for m in members}
            if None in dims or len(dims) > 1:
                # a whole-tensor member, or slices along several dims: their A1 / A2 parts always intersect
                if len(signs) > 1:
                    raise error(f"rescale symmetry {sym.name!r}: A1 and A2 overlap in {pname!r}", overlap_fix)
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
                lst = triples.setdefault((pname, key), [])
                lst.extend((c, gid, sign) for c in table.reshape(-1).nonzero().flatten().tolist())
                continue
            (d,) = dims
            assert d is not None
            owner: dict[int, float] = {}
            for m in members:
                assert m.index is not None
                for i in m.index:
                    if owner.setdefault(i, m.sign) != m.sign:
                        raise error(f"rescale symmetry {sym.name!r}: A1 and A2 overlap in {pname!r}", overlap_fix)
            triples.setdefault((pname, (d,)), []).extend((i, gid, s) for i, s in sorted(owner.items()))
    return triples


def triples_block(triples: dict[tuple[str, Key], list[tuple[int, int, float]]], sym: Symmetry, gid: int, pname: str,
                  shape: tuple[int, ...], members: Sequence, error: type[NMechError]) -> None:
    """Members with a second restriction (`Member.sub_dim`: the blocks of grouped convolutions).

    The key is the union of every member's dims and sub dims; each member marks the cells of its block
    (index along dim x sub_index along sub_dim, everything along the key's other dims), so a cell belongs to
    the group exactly when `Symmetry.masks()` selects the entries it stands for; A1 and A2 may not share one.
    """
    ndim = len(shape)
    dims: set[int] = set()
    for m in members:
        dims.add(_norm_dim(m.dim, ndim))
        if m.sub_dim is not None:
            if not -ndim <= m.sub_dim < ndim:
                raise error(f"symmetry {sym.name!r}: sub dim {m.sub_dim} out of range for {pname!r} of shape {shape}",
                            "fix or re-detect the symmetry set")
            sd = _norm_dim(m.sub_dim, ndim)
            bad = [i for i in (m.sub_index or ()) if not 0 <= i < shape[sd]]
            if bad:
                raise error(f"symmetry {sym.name!r}: sub index {bad[:5]} out of range for {pname!r} of shape {shape} "
                            f"along dim {m.sub_dim}", "fix or re-detect the symmetry set")
            dims.add(sd)
    key = tuple(sorted(dims))
    table = torch.zeros([shape[d] for d in key], dtype=torch.int8)
    for m in members:
        mask = torch.zeros(table.shape, dtype=torch.bool)
        pos = key.index(_norm_dim(m.dim, ndim))
        mask.index_fill_(pos, torch.tensor(sorted(set(m.index)), dtype=torch.long), True)
        if m.sub_dim is not None:
            keep = torch.zeros(table.shape, dtype=torch.bool)
            keep.index_fill_(key.index(_norm_dim(m.sub_dim, ndim)),
                             torch.tensor(sorted(set(m.sub_index)), dtype=torch.long), True)
            mask &= keep
        sign = int(m.sign)
        if bool((table[mask] == -sign).any()):
            raise error(f"rescale symmetry {sym.name!r}: A1 and A2 overlap in {pname!r}",
                        "a coordinate can be in A1 or in A2 of one group, not both")
        table[mask] = sign
    flat = table.reshape(-1)
    cells = flat.nonzero().flatten()
    triples.setdefault((pname, key), []).extend(
        (c, gid, float(v)) for c, v in zip(cells.tolist(), flat[cells].tolist(), strict=True))
