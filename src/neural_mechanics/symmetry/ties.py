"""Tied parameters: one tensor used by several ops (GPT-2's, BERT's and T5's tied input/output embeddings).

Scaling a slice of a parameter acts on every op that uses it. Each use u of a parameter P gives every element
of P a factor: the product of the factors of the channel classes its slices write (alpha) or read (1/alpha)
there, 1 where the slice is in no moving class (e.g. the logits a tied LM head writes are read by a softmax,
so its rows cannot move). A group action is consistent with the tie when every element gets the same factor
in every use. This module states that as unions of the channel classes, after the op rules have run:

- in each use, the live contributions of P (those whose class is not INVARIANT) must lie on one dimension d,
  the same for every use, at most one per index: then the factor of P[..., i, ...] (index i on d) in use u is
  the factor of one class, `sigma_u(i)`, alpha for a writer and 1/alpha for a reader (or 1 if none);
- for every index i, all sigma_u(i) must be equal: classes met as writers in both uses are united, a class
  written in one use and read in the other is united *anti* (it scales by the inverse: `UnionFind.union(...,
  anti=True)`), and a class that meets "1" in another use is tainted;
- anything else (live slices on two dimensions, two live slices at one index, a whole-tensor slice, a use
  that reads P twice) taints every class P's slices are in: P is then in no group, as any shared parameter
  was before.

Example (GPT-2 with tied embeddings, W = wte.weight of shape (V, E)): the embedding writes stream feature d
with column W[:, d] (alpha_S), the LM head reads final-LayerNorm feature d with the same column (1/alpha_F_d)
and writes the logits with rows W[c] (not moving). So alpha_S = 1/alpha_F_d for every d: the residual-stream
scale group and the final LayerNorm's affine -> head column rescale groups merge into one rescale group,
A1 = the stream's writers (W included), A2 = the final LayerNorm's weight and bias. The tie also removes the
head's softmax translations (adding to a column of W would shift the stream too): a tied parameter is never
in a translation group (`Analysis.alone`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, Contribution, module_of, opname
from neural_mechanics.symmetry.graph import INVARIANT

ONE = (INVARIANT, 0)
"""sigma of an index that does not move in a use (factor 1)."""


@dataclass(frozen=True)
class TieOutcome:
    """What became of one tied parameter: joined over its uses ("joint"), or blocked with the reason."""

    param: str
    uses: int
    joint: bool
    reason: str


def _sigma(a: Analysis, contribs: list[Contribution]) -> tuple[int | None, dict[int, tuple[int, int]]] | str:
    """(dim, index -> (class root, parity of the factor)) of one use's live contributions, or why they cannot tie.

    A writer ("in") scales with its class, a reader ("out") inversely: parity 1.
    """
    dim: int | None = None
    sigma: dict[int, tuple[int, int]] = {}
    for c in contribs:
        root, parity = a.uf.find_parity(c.slot)
        if root == INVARIANT:
            continue
        if c.dim is None or c.index is None or c.sub is not None:
            return "a use scales the whole tensor or a block of it"
        if dim is not None and c.dim != dim:
            return f"a use scales it along two dims ({dim} and {c.dim})"
        dim = c.dim
        for i in c.index:
            if i in sigma:
                return f"a use reads and writes index {i} along dim {dim}"
            sigma[i] = (root, parity ^ (c.role == "out"))
    return dim, sigma


def _taint_all(a: Analysis, contribs: list[Contribution]) -> None:
    for c in contribs:
        a.uf.union(INVARIANT, c.slot)


def resolve_ties(a: Analysis) -> list[TieOutcome]:
    """Join the classes of every tied parameter's uses (see the module docstring); taint them where they conflict."""
    outcomes = []
    for name, uses in a.tie_uses.items():
        every = [c for cs in uses.values() for c in cs]
        reason = ""
        if len(uses) != a.tied[name] or any(n in a.tie_twice for n in uses):
            reason = "an op uses it twice"
        per_use: list[tuple[Node, int | None, dict[int, tuple[int, int]]]] = []
        if not reason:
            for node, contribs in uses.items():
                got = _sigma(a, contribs)
                if isinstance(got, str):
                    reason = f"{got} ({opname(node)})"
                    break
                per_use.append((node, *got))
        dims = {d for _, d, _ in per_use if d is not None}
        if not reason and len(dims) > 1:
            reason = f"its uses scale it along different dims {sorted(dims)}"
        if reason:
            moving = [node for node, cs in uses.items() if any(a.uf.find(c.slot) != INVARIANT for c in cs)]
            _taint_all(a, every)
            for node in moving:
                a.note_blocked(node, f"{opname(node)} (tied parameter)")
            outcomes.append(TieOutcome(name, len(uses), False, reason))
            continue
        indices = sorted({i for _, _, sigma in per_use for i in sigma})
        for i in indices:
            first = per_use[0][2].get(i, ONE)
            for _, _, sigma in per_use[1:]:
                other = sigma.get(i, ONE)
                if first == ONE or other == ONE:
                    a.uf.union(INVARIANT, first[0])
                    a.uf.union(INVARIANT, other[0])
                else:
                    a.uf.union(first[0], other[0], anti=bool(first[1] ^ other[1]))
        for node in uses:
            a.couplings.extend(
                (c.slot, f"{module_of(name)}: {name} is tied: {opname(node)} uses the same tensor")
                for c in uses[node] if a.uf.find(c.slot) != INVARIANT)
        live = any(a.uf.find(c.slot) != INVARIANT for c in every)
        outcomes.append(TieOutcome(name, len(uses), live, "" if live else "no use lets it move"))
    return outcomes
