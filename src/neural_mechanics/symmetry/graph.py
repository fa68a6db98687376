"""Channel slots and their classes: the index bookkeeping behind symmetry detection.

A *slot* is one channel of one activation (a writer's output channel, a LayerNorm feature, ...).
Every activation node carries a *label tensor*: an int64 tensor broadcastable to the node's shape
whose entry at a position is the slot that position belongs to. Dimensions along which the label is
constant are stored with size 1 ("compressed"), so a conv output (N, C, H, W) is labelled by a
(1, C, 1, 1) tensor. Two special labels:

- ZERO (-1): the entry is a known zero (zero padding, `zeros_like`); it contributes nothing.
- INVARIANT (0): the entry does not move under any valid group action (raw inputs, buffers,
  constants, outputs of barriers). Slot 0 doubles as the "tainted" element of the union-find: a class
  joined to it cannot be scaled.

Index-mapping ops (view, flatten, permute, cat, split, pad, channel shuffle...) are applied to the
label tensors themselves, the way pruning dependency graphs (Torch-Pruning's DepGraph) map indices:
the labels that land at an output position say which input channel it came from. Ops that mix
entries homogeneously (add, mean, pooling, a normaliser's statistic) union the slots they mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

ZERO = -1
INVARIANT = 0


class UnionFind:
    """Disjoint sets over slot ids 0..n-1 (0 = INVARIANT/tainted), with path halving and a parity per slot.

    Most unions say "these slots scale by the same factor". A tied parameter (one tensor used by two ops,
    symmetry/ties.py) can also say "slot a scales by alpha exactly when slot b scales by 1/alpha": an
    *anti* union. Each slot keeps the parity of its factor's exponent relative to its class root
    (`find_parity`: 0 = alpha, 1 = 1/alpha). An anti union between two slots already in one class with the
    same parity (alpha = 1/alpha) leaves alpha = 1 only: the class is tainted. Parity with INVARIANT means
    nothing (1 = 1/1). Until the first anti union every parity is 0 and the bookkeeping costs nothing.
    """

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.parity: list[int] = [0]
        self.signed = False
        """True once an anti union happened (before that every parity is 0)."""

    def new(self, n: int) -> int:
        """Allocate n fresh slots; return the first id."""
        first = len(self.parent)
        self.parent.extend(range(first, first + n))
        self.parity.extend([0] * n)
        return first

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, a: int) -> int:
        parent = self.parent
        if not self.signed:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a
        parity = self.parity
        while parent[a] != a:
            p = parent[a]
            parity[a] ^= parity[p]  # parity of a relative to its grandparent
            parent[a] = parent[p]
            a = parent[a]
        return a

    def find_parity(self, a: int) -> tuple[int, int]:
        """(root, parity of a relative to the root): a scales by alpha**(-1)**parity when the root scales by alpha."""
        root = self.find(a)
        if not self.signed:
            return root, 0
        p = 0
        while a != root:
            p ^= self.parity[a]
            a = self.parent[a]
        return root, p

    def union(self, a: int, b: int, anti: bool = False) -> bool:
        """Join the classes of a and b (INVARIANT wins as root); True if they were different.

        anti=True: b scales by the inverse of a's factor. Joining a class to itself with the wrong parity
        (alpha = 1/alpha) taints it.
        """
        if anti and not self.signed:
            self.signed = True
        if not self.signed:
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                return False
            if rb == INVARIANT or (ra != INVARIANT and rb < ra):
                ra, rb = rb, ra
            self.parent[rb] = ra
            return True
        (ra, pa), (rb, pb) = self.find_parity(a), self.find_parity(b)
        if ra == rb:
            if ra != INVARIANT and (pa ^ pb) != int(anti):
                self.union(INVARIANT, ra)  # alpha = 1/alpha: only alpha = 1 is left
            return False
        if rb == INVARIANT or (ra != INVARIANT and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.parity[rb] = 0 if ra == INVARIANT else pa ^ pb ^ int(anti)
        return True

    def union_all(self, labels: Iterable[int]) -> int | None:
        """Join every label >= 0 in `labels`; return a representative label (or None if none)."""
        first: int | None = None
        for lab in labels:
            if lab < 0:
                continue
            if first is None:
                first = lab
            else:
                self.union(first, lab)
        return first

    def tainted(self, a: int) -> bool:
        return self.find(a) == self.find(INVARIANT)


def invariant_label(ndim: int) -> Tensor:
    return torch.zeros((1,) * ndim, dtype=torch.long)


def zero_label(ndim: int) -> Tensor:
    return torch.full((1,) * ndim, ZERO, dtype=torch.long)


def compress(lab: Tensor) -> Tensor:
    """Shrink every dimension along which the labels are constant to size 1."""
    for d in range(lab.ndim):
        if lab.shape[d] > 1:
            first = lab.narrow(d, 0, 1)
            if bool((lab == first).all()):
                lab = first
    return lab


def fit(lab: Tensor, ndim: int) -> Tensor:
    """Left-pad a label tensor with size-1 dims (or drop leading size-1 dims) to rank `ndim`."""
    while lab.ndim < ndim:
        lab = lab.unsqueeze(0)
    while lab.ndim > ndim and lab.shape[0] == 1:
        lab = lab.squeeze(0)
    return lab


def live(lab: Tensor) -> bool:
    """True if any entry is a real slot (not ZERO / INVARIANT)."""
    return bool((lab > 0).any())


def slots_in(lab: Tensor) -> list[int]:
    return [int(v) for v in torch.unique(lab).tolist() if v > 0]


def taint(uf: UnionFind, lab: Tensor) -> None:
    """Join every slot of `lab` to INVARIANT: those classes cannot be scaled."""
    for s in slots_in(lab):
        uf.union(INVARIANT, s)


def collapse(uf: UnionFind, lab: Tensor, dims: Sequence[int]) -> Tensor:
    """Union the labels within each fibre along `dims`; return labels of size 1 along `dims`.

    Implements "an op that mixes entries along `dims` homogeneously (sum, mean, pooling, a normaliser's
    statistic) ties together every slot it mixes".
    """
    dims = sorted({d % lab.ndim for d in dims}) if lab.ndim else []
    if not dims or all(lab.shape[d] == 1 for d in dims):
        return lab
    keep = [d for d in range(lab.ndim) if d not in dims]
    perm = keep + dims
    moved = lab.permute(perm)
    rows = moved.reshape(-1, int(torch.tensor([lab.shape[d] for d in dims]).prod()))
    reps = []
    for row in rows.tolist():
        rep = uf.union_all(set(row))
        reps.append(ZERO if rep is None else rep)
    out = torch.tensor(reps, dtype=torch.long).reshape([lab.shape[d] for d in keep] + [1] * len(dims))
    inverse = [perm.index(d) for d in range(lab.ndim)]
    return out.permute(inverse).contiguous()


def per_index(uf: UnionFind, lab: Tensor, dim: int, size: int) -> list[int]:
    """The slot read at each index along `dim` (after uniting everything within that index's fibre)."""
    dim = dim % lab.ndim
    col = collapse(uf, lab, [d for d in range(lab.ndim) if d != dim])
    col = col.reshape(-1)
    if col.numel() == 1:
        return [int(col.item())] * size
    return [int(v) for v in col.tolist()]


def union_pairs(uf: UnionFind, a: Tensor, b: Tensor) -> list[tuple[int, int]]:
    """Union a and b elementwise (after broadcasting); return the pairs of live slots newly joined."""
    a2, b2 = torch.broadcast_tensors(a, b)
    pairs = torch.unique(torch.stack([a2.reshape(-1), b2.reshape(-1)], 1), dim=0).tolist()
    joined = []
    for x, y in pairs:
        if x >= 0 and y >= 0 and uf.union(x, y) and x > 0 and y > 0:
            joined.append((x, y))
    return joined
