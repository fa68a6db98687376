"""Moving parameters along the orbits of their symmetry groups: the kernel shared by act, balance, equalize
and alignment.

A point on the orbit of theta under scale and rescale groups i and translation groups j is

    theta' = theta * exp(sum_i u_i D_i) + sum_j t_j 1_{A_j}        (u_i = log alpha_i)

with D_i the signed mask of group i (+1 on A / A1, -1 on A2; docs/theory.md section 1). Every group action
is a symmetry, so every such theta' computes the same function as theta. The transforms built on this
module (`balance`, `equalize`, `distance_up_to_symmetry`) are coordinate descent over the groups: for one
group, with the others held fixed, the best factor has a closed form in a few per-group sums (|theta|^2 over
A1 and over A2, <theta_a, theta_b>, the largest |theta| ...), and it is applied by one multiplication.

Colouring. Two groups that share no parameter entry do not interact: the objective of each transform is a
sum over entries, and an entry's term depends only on the groups that contain it. So a *colour class* of
pairwise disjoint groups is updated at once, with exactly the result of updating its groups one by one
(block coordinate descent; Gauss-Seidel across classes). `Orbits` colours groups greedily; two groups
conflict when they share a cell of the incidence table, or when they slice one parameter along different
keys (a row and a column always intersect; treating every such pair as a conflict only ever adds colours,
never merges groups that interact). A chain of layers needs two or three colours.

Per-group sums come from the compiled incidence (symmetry/incidence.py): one reduction per parameter and
slicing key, one `index_add_` (sums) or `scatter_reduce_` (maxima) over the (cell, group, sign) triples, split
by sign into the A1 side (sign +1, also the whole of a scale or translation group) and the A2 side (sign -1).
`Orbits.side_sums` does that on full tensors (alignment, whose translations add to the parameters);
`CoreState` keeps purely multiplicative moves (balance, equalize) on small per-parameter cores instead.
`young_omega` is the over-relaxation factor both coordinate descents use once their rate has settled.
Everything runs on a float64 copy of the parameters; `write_back` casts the result to each parameter's dtype.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.incidence import Factor, GroupIncidence

__all__ = ["NOISE", "CoreState", "Orbits", "SymmetryUseError", "float64_params", "target_model",
           "transform_model", "write_back", "young_omega"]


class SymmetryUseError(NMechError):
    """A transform, split or completeness check cannot run on the model and groups as given."""


def float64_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached float64 copies of every parameter (name -> tensor), the working point of the transforms."""
    out = {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}
    if not out:
        raise SymmetryUseError(f"{type(model).__name__} has no parameters",
                               "pass the model the symmetries were found on")
    return out


def target_model(model: nn.Module, inplace: bool) -> nn.Module:
    """The model a transform writes to: the model itself (inplace) or a deep copy (mode, device, dtype kept)."""
    return model if inplace else copy.deepcopy(model)


def write_back(model: nn.Module, params: Mapping[str, Tensor], names: Iterable[str]) -> None:
    """Copy params[name] (float64) into the model's parameter `name`, cast to its dtype and device."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            p = own[name]
            p.copy_(params[name].to(device=p.device, dtype=p.dtype))


NOISE = 1e-12
"""A relative increase of an objective smaller than this is float64 rounding of its sum, not an increase."""
MAX_OMEGA = 1.9


def young_omega(ratios: Sequence[float]) -> float:
    """Young's over-relaxation factor 2 / (1 + sqrt(1 - rho)) for a Gauss-Seidel sweep that contracts the
    error by rho per sweep, once the recent contraction ratios have settled (all within 1% of each other,
    rho < 1); 1.0 while they have not.

    Why: coordinate descent over colour classes converges linearly, slowly where groups are strongly
    coupled (deep chains: rho = 1 - O(1/L^2)); over-relaxed steps (successive over-relaxation) cut the
    number of sweeps from O(L^2) to O(L) for 2-cyclic (red-black) orderings. Early ratios understate the
    asymptotic rate (fast modes die first), and an omega a little above the optimum costs less than one
    below it, hence the wait and rho = the largest recent ratio. Callers keep a safeguard: a sweep that
    increases their objective is undone and they continue with omega = 1.
    """
    if len(ratios) < 4:
        return 1.0
    rho = max(ratios)
    if not 0 < min(ratios) <= rho < 1 or rho - min(ratios) > 0.01 * rho:
        return 1.0
    return min(2 / (1 + math.sqrt(1 - rho)), MAX_OMEGA)


class Converging(Protocol):
    """What a coordinate descent reports: sweeps done, final residual, and whether it met its tolerance."""

    sweeps: int
    residual: float
    converged: bool


R = TypeVar("R", bound=Converging)


def transform_model(model: nn.Module, inplace: bool, solve: Callable[[dict[str, Tensor]], R], touched: Iterable[str],
                    what: str) -> tuple[nn.Module, R]:
    """Run `solve` (in place on a float64 parameter dict) for a copy of the model or the model itself, write the
    touched parameters back, and warn (RuntimeWarning) when it stopped before converging."""
    out = target_model(model, inplace)
    params = float64_params(out)
    result = solve(params)
    if not result.converged:
        warnings.warn(f"{what} stopped after {result.sweeps} sweeps with residual {result.residual:.3g} above its "
                      "tolerance; raise max_sweeps to go further", RuntimeWarning, stacklevel=3)
    write_back(out, params, touched)
    return out, result


def _as_list(symmetries: Symmetry | Iterable[Symmetry]) -> list[Symmetry]:
    return [symmetries] if isinstance(symmetries, Symmetry) else list(symmetries)


class Orbits:
    """Groups compiled against a parameter dict, split into colour classes of pairwise disjoint groups.

    `symmetries` may mix kinds; `params` maps every parameter name to its (float64) tensor. Raises
    SymmetryUseError when a group does not fit the parameters (unknown name, index out of range, A1 and A2
    overlapping).
    """

    def __init__(self, symmetries: Symmetry | Iterable[Symmetry], params: Mapping[str, Tensor]):
        self.symmetries = _as_list(symmetries)
        self.n = len(self.symmetries)
        self.incidence = GroupIncidence(self.symmetries, params, error=SymmetryUseError)
        inc = self.incidence
        self.positive = inc.sign > 0
        """bool [nnz]: the triple is on the A1 side (or in a scale / translation group)."""
        kinds = [s.kind for s in self.symmetries]
        self.device = inc.device
        """Where the per-group vectors live (the parameters' device)."""
        self.is_scale = torch.tensor([k == "scale" for k in kinds], dtype=torch.bool, device=self.device)
        self.is_rescale = torch.tensor([k == "rescale" for k in kinds], dtype=torch.bool, device=self.device)
        self.is_translation = torch.tensor([k == "translation" for k in kinds], dtype=torch.bool, device=self.device)

    # ---- colouring ------------------------------------------------------------------------------
    @cached_property
    def colors(self) -> list[Tensor]:
        """Per colour class, the sorted long tensor of its group ids (greedy: each group takes the smallest
        colour that no conflicting group holds yet)."""
        inc = self.incidence
        if self.n == 0:
            return []
        offsets = torch.tensor([b.offset for b in inc.blocks], dtype=torch.long)
        block_of = (torch.searchsorted(offsets, inc.cell.cpu(), right=True) - 1).tolist()
        param_of_block = [b.param for b in inc.blocks]
        blocks_of_param: dict[str, list[int]] = {}
        for i, blk in enumerate(inc.blocks):
            blocks_of_param.setdefault(blk.param, []).append(i)
        per_group: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]
        for cell, group, block in zip(inc.cell.tolist(), inc.group.tolist(), block_of, strict=True):
            per_group[group].append((cell, block))
        at_cell: dict[int, set[int]] = {}
        at_block: dict[int, set[int]] = {}
        colour = [0] * self.n
        for g, triples in enumerate(per_group):
            forbidden: set[int] = set()
            blocks = {bid for _, bid in triples}
            for cell, _ in triples:
                forbidden |= at_cell.get(cell, set())
            for bid in blocks:
                for other in blocks_of_param[param_of_block[bid]]:
                    if other != bid:
                        forbidden |= at_block.get(other, set())
            c = 0
            while c in forbidden:
                c += 1
            colour[g] = c
            for cell, _ in triples:
                at_cell.setdefault(cell, set()).add(c)
            for bid in blocks:
                at_block.setdefault(bid, set()).add(c)
        col = torch.tensor(colour, dtype=torch.long)
        return [torch.nonzero(col == c).flatten().to(self.device) for c in range(int(col.max()) + 1)]

    def selected(self, colour: Tensor) -> Tensor:
        """bool [groups]: True on the groups of one colour class."""
        sel = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        sel[colour] = True
        return sel

    def zeros(self) -> Tensor:
        """A float64 vector with one entry per group, on the groups' device."""
        return torch.zeros(self.n, dtype=torch.float64, device=self.device)

    # ---- per-group reductions -------------------------------------------------------------------
    def side_sums(self, factors: Callable[[str], Sequence[Factor]], n: int) -> tuple[Tensor, Tensor]:
        """([n, groups], [n, groups]) float64: per group and quantity q, the sum of factors(param)[q] over A1
        (all of A for scale and translation groups) and over A2 (zero for them).

        A factor is a tensor x (sum of x) or a pair (x, y) (sum of x * y), as in `GroupIncidence.cells`.
        """
        inc = self.incidence
        cells = inc.cells(factors, n)
        vals = cells.index_select(1, inc.cell)
        out = []
        for side in (self.positive, ~self.positive):
            s = torch.zeros((n, self.n), dtype=torch.float64, device=inc.device)
            s.index_add_(1, inc.group[side], vals[:, side])
            out.append(s)
        return out[0], out[1]

    def sizes(self) -> Tensor:
        """|A_i|: the number of parameter entries of each group (float64)."""
        return self.incidence.sizes()

    # ---- moving along the orbit -----------------------------------------------------------------
    def multiply(self, params: dict[str, Tensor], log_alpha: Tensor) -> None:
        """In place: theta <- theta * exp(sum_i log_alpha_i D_i) (scale and rescale groups; others must be 0)."""
        if not bool(log_alpha.any()):
            return
        for name, f in self.incidence.expand(log_alpha).items():
            params[name].mul_(f.exp())

    def shift(self, params: dict[str, Tensor], shifts: Tensor) -> None:
        """In place: theta <- theta + sum_j t_j 1_{A_j} (translation groups; others must be 0)."""
        if not bool(shifts.any()):
            return
        for name, f in self.incidence.expand(shifts, signed=False).items():
            params[name].add_(f)

    @property
    def params(self) -> list[str]:
        """Names of the parameters the groups touch."""
        return self.incidence.params


class CoreState:
    """theta' = theta * exp(L) for multiplicative (scale / rescale) groups, kept on per-parameter *cores*.

    The groups of a parameter slice it along the dims of their keys; their union U is the only place where
    the accumulated log-factor L can vary, and L is a sum of one cell table per (parameter, key) block. So
    every per-group quantity the transforms need is a function of small tables over U: the core of squares
    C = sum over the other dims of theta'^2 and the core of maxima M = max over the other dims of |theta'|.
    A step with log-factors u changes a block's cells by delta = sum_i u_i D_i and multiplies the cores by
    exp(2 delta) and exp(delta), broadcast over U:

        sum over a cell of theta'^2 = sum over the cell's U-entries of C,
        max over a cell of |theta'| = max over the cell's U-entries of M,

    so a step costs O(total core size) (out x in for a conv, not out x in x k x k), exponentials are only
    taken of cell tables, and the full tensors are multiplied once, by `apply`. `include_max(name, tensor)`
    selects the parameters whose entries count in the maxima (others count 0). The cores are updated by
    multiplication: after k steps they carry ~k float64 roundings, far below the tolerances used.
    """

    def __init__(self, orbits: Orbits, params: Mapping[str, Tensor],
                 include_max: Callable[[str, Tensor], bool] | None = None):
        self.orbits = orbits
        inc = orbits.incidence
        self.union: dict[str, tuple[int, ...]] = {}
        for b in inc.blocks:
            self.union[b.param] = tuple(sorted(set(self.union.get(b.param, ())) | set(b.key)))
        self.squares_core: dict[str, Tensor] = {}
        self.max_core: dict[str, Tensor] = {}
        for name, u in self.union.items():
            p = params[name].to(torch.float64)
            other = [d for d in range(p.ndim) if d not in u]
            sq = p * p
            self.squares_core[name] = sq.sum(dim=other) if other else sq.clone()
            if include_max is not None and include_max(name, params[name]):
                a = p.abs()
                self.max_core[name] = a.amax(dim=other) if other else a.clone()
        self.cell_log = torch.zeros(inc.total_cells, dtype=torch.float64, device=inc.device)
        """Accumulated log-factor of every cell (L is the broadcast sum of its blocks' cell tables)."""

    def _view(self, name: str, key: tuple[int, ...]) -> list[int]:
        """Shape that broadcasts a key's cell table over the core of `name`."""
        shape = self.squares_core[name].shape
        return [shape[j] if d in key else 1 for j, d in enumerate(self.union[name])]

    def _other(self, name: str, key: tuple[int, ...]) -> list[int]:
        return [j for j, d in enumerate(self.union[name]) if d not in key]

    def multiply(self, log_alpha: Tensor) -> None:
        """theta' <- theta' * exp(sum_i log_alpha_i D_i), on the cores (`apply` moves the parameters)."""
        inc = self.orbits.incidence
        w = log_alpha.to(torch.float64).index_select(0, inc.group) * inc.sign
        delta = torch.zeros(inc.total_cells, dtype=torch.float64, device=inc.device).index_add_(0, inc.cell, w)
        self.cell_log += delta
        for b in inc.blocks:
            d = delta[b.offset:b.offset + b.n_cells]
            if not bool(d.any()):
                continue
            view = self._view(b.param, b.key)
            self.squares_core[b.param].mul_(torch.exp(2 * d).view(view))
            if b.param in self.max_core:
                self.max_core[b.param].mul_(torch.exp(d).view(view))

    def _sides(self, tables: Mapping[str, Tensor], reduce: str) -> tuple[Tensor, Tensor]:
        orb = self.orbits
        inc = orb.incidence
        cells = torch.zeros(inc.total_cells, dtype=torch.float64, device=inc.device)
        for b in inc.blocks:
            t = tables.get(b.param)
            if t is None:
                continue
            other = self._other(b.param, b.key)
            if other:
                t = t.sum(dim=other) if reduce == "sum" else t.amax(dim=other)
            cells[b.offset:b.offset + b.n_cells] = t.reshape(-1)
        vals = cells.index_select(0, inc.cell)
        out = []
        for side in (orb.positive, ~orb.positive):
            r = torch.zeros(orb.n, dtype=torch.float64, device=inc.device)
            if reduce == "sum":
                r.index_add_(0, inc.group[side], vals[side])
            else:
                r.scatter_reduce_(0, inc.group[side], vals[side], reduce="amax", include_self=True)
            out.append(r)
        return out[0], out[1]

    def squares(self) -> tuple[Tensor, Tensor]:
        """(N1, N2) per group at theta': |theta'|^2 over A1 (all of A for scale groups) and over A2."""
        return self._sides(self.squares_core, "sum")

    def maxima(self) -> tuple[Tensor, Tensor]:
        """(r1, r2) per group at theta': max |theta'| over the included entries of A1 and of A2."""
        return self._sides(self.max_core, "max")

    def total_square(self) -> float:
        """|theta'|^2 summed over every parameter the groups touch."""
        return float(sum(float(c.sum()) for c in self.squares_core.values()))

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        return ({n: t.clone() for n, t in self.squares_core.items()}, {n: t.clone() for n, t in self.max_core.items()},
                self.cell_log.clone())

    def restore(self, snap: tuple[dict[str, Tensor], dict[str, Tensor], Tensor]) -> None:
        sq, mx, cell_log = snap
        self.squares_core, self.max_core, self.cell_log = sq, mx, cell_log

    def apply(self, params: dict[str, Tensor]) -> None:
        """params[name] <- params[name] * exp(L) for every touched parameter (L then restarts at 0)."""
        inc = self.orbits.incidence
        for b in inc.blocks:
            d = self.cell_log[b.offset:b.offset + b.n_cells]
            if not bool(d.any()):
                continue
            p = params[b.param]
            view = [p.shape[k] if k in b.key else 1 for k in range(p.ndim)]
            params[b.param] = p * torch.exp(d).view(view)
        self.cell_log.zero_()
