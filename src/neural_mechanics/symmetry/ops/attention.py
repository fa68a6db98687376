"""Attention: contractions of two moving factors, and the query/key rescale pairs they allow.

Contractions of two moving factors (attention scores q k^T, in `scaled_dot_product_attention` or an
explicit `matmul`) are the one place where two classes scale in opposite directions: score(i, j) =
sum_c q_{i,c} k_{j,c} is unchanged when query channel c scales by alpha and key channel c by 1/alpha.
The rules record such a site (`ContractionSite`) instead of tainting its factors at once; once every op
has been seen, `resolve_contractions` keeps the pairs whose classes do nothing else (no readers, no
normalisers, no ties, one writer layer, one contraction coordinate: `QKPair`) and then taints every
factor, so that no ordinary group is built from a query or key channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import (
    Analysis,
    Contribution,
    Labels,
    flat_list,
    module_of,
    ndim_of,
    opname,
    oriented_classes,
    shape_of,
)
from neural_mechanics.symmetry.graph import (
    INVARIANT,
    collapse,
    fit,
    invariant_label,
    live,
    slots_in,
)
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.registry import Shift, define, register


@dataclass
class ContractionSite:
    """out[..., i, j] = sum_c x[..., i, c] y[..., j, c] with both factors moving (queries x, keys y).

    `pairs` holds the distinct (c, query slot, key slot) met at the contraction: query channel c is one slot
    over every query token and key channel c one slot over every key token, per batch/head position.
    """

    node: Node
    pairs: list[tuple[int, int, int]]
    slots: list[int]
    """Every live slot of both factors (tainted once the site is resolved)."""
    what: str
    """How the op is named in `.details()`, e.g. "aten.matmul (matmul_2)"."""
    blocked_as: str | None = None
    """The `Analysis.blocked` key counted if a pair fails (None: already counted at the op)."""


@dataclass
class QKPair:
    """Query channel classes and key channel classes that meet only each other, at attention contractions.

    Scaling every query class by alpha and every key class by 1/alpha (alpha > 0) scales each term
    q_{i,c} k_{j,c} of a score it enters by alpha / alpha = 1, which leaves every score (and so the loss)
    unchanged. One query class and one key class at one coordinate is the plain per-coordinate pair; a
    rotary embedding joins coordinates c and c + d/2 of one head into one class (`coords` has both); a key
    head shared by several query heads (grouped-query attention) pairs one key class with the query
    classes of all those heads.
    """

    query: list[Contribution]
    key: list[Contribution]
    coords: tuple[int, ...]
    text: str


def _contraction_site(a: Analysis, node: Node, x: Any, y: Any, y_transposed: bool,
                      y_labels: Tensor | None = None) -> ContractionSite | None:
    """The site of sum_c x[..., i, c] y[..., j, c] (y[..., c, j] when `y_transposed`), or None if unpaired.

    Paired means: both factors are live and every entry of both moves (a channel that does not move on one
    side cannot compensate the other). The site records every distinct (c, slot of q[..., i, c], slot of
    k[..., j, c]) over all batch/head positions and all tokens i, j: the terms q_{i,c} k_{j,c} of the scores.
    Usually a channel carries one slot over all tokens; it need not (transformers folds the query heads into
    the token axis for one-token grouped-query attention).
    """
    sx, sy = shape_of(x), shape_of(y)
    if len(sx) < 2 or len(sy) < 2:
        return None
    lx, ly = a.lab(x, len(sx)), a.lab(y, len(sy)) if y_labels is None else y_labels
    if not (live(lx) and live(ly)):
        return None
    if y_transposed:
        ly, sy = ly.transpose(-2, -1), (*sy[:-2], sy[-1], sy[-2])
    n = sx[-1]
    if sy[-1] != n:
        return None
    try:
        batch = torch.broadcast_shapes(tuple(lx.shape[:-2]), tuple(ly.shape[:-2]))
    except RuntimeError:
        return None
    lx = lx.expand(*batch, lx.shape[-2], n)
    ly = ly.expand(*batch, ly.shape[-2], n)
    if not (bool((lx > 0).all()) and bool((ly > 0).all())):
        return None  # a channel that does not move on one side cannot compensate the other
    q, k = torch.broadcast_tensors(lx.unsqueeze(-2), ly.unsqueeze(-3))  # (..., I, J, n): the terms q_ic k_jc
    coord = torch.arange(n).expand(q.shape)
    pairs = torch.unique(torch.stack([coord.reshape(-1), q.reshape(-1), k.reshape(-1)], 1), dim=0)
    return ContractionSite(node, [(int(c), int(qs), int(ks)) for c, qs, ks in pairs.tolist()],
                           slots_in(lx) + slots_in(ly), f"{opname(node)} ({node.name})", opname(node))


def factors(node: Node) -> tuple[Any, Any]:
    """The left and right factor of matmul(input, other) / bmm(input, mat2)."""
    args = op_args(node)
    return args["input"], args["other"] if "other" in args else args["mat2"]


@register("matmul", "bmm", shift=Shift.SCORES)
def h_matmul(a: Analysis, node: Node) -> Labels:
    """contraction: x @ W with one side fixed passes the other side's channels on; q @ k^T pairs channels.

    x @ W with one side that does not move: linear in the other side, which passes its channels on.

    out[..., i, d] = sum_j A[..., i, j] V[..., j, d]: with A fixed (attention weights: a softmax of
    queries and keys), V's slots are mixed along j (united) and keep their channel d; with the right
    factor fixed, the left's slots are mixed along its last dim. Both factors moving (scores q @ k^T):
    the output does not move under the paired action (query channel c by alpha, key channel c by
    1/alpha), recorded as a `ContractionSite`; a barrier when the channels do not pair up.
    """
    x, y = factors(node)
    nd = ndim_of(node)
    if ndim_of(x) < 2 or ndim_of(y) < 2:
        return a.barrier(node)
    lx, ly = a.lab(x, ndim_of(x)), a.lab(y, ndim_of(y))
    if a.moving(lx) and a.moving(ly):
        site = _contraction_site(a, node, x, y, y_transposed=True)
        if site is None:
            return a.barrier(node)
        a.contraction_sites.append(site)
        return invariant_label(nd)
    if a.moving(ly):  # attention @ values: channel d of V stays channel d
        out = fit(collapse(a.uf, ly, [ly.ndim - 2]), nd)
        text = f"{opname(node)} ({node.name}): fixed weights @ values keeps value channel d as output channel d"
        for slot in slots_in(out):
            a.couplings.append((slot, text))
        return out
    if live(lx):
        return fit(collapse(a.uf, lx, [lx.ndim - 1]), nd)
    return invariant_label(nd)


@register("scaled_dot_product_attention", shift=Shift.ATTENTION_KEY)
def h_sdpa(a: Analysis, node: Node) -> Labels:
    """contraction: softmax(q k^T / sqrt(d) + mask) v pairs query and key channels; value channels pass on.

    scaled_dot_product_attention(q, k, v, mask): softmax(q k^T / sqrt(d) + mask) v.

    The weights depend on q and k only through the scores sum_c q_{i,c} k_{j,c}: query channel c by
    alpha with key channel c by 1/alpha leaves them unchanged (a `ContractionSite`, resolved at the end);
    q and k are a barrier otherwise (a softmax of their product is not homogeneous in either). Given the
    weights, the output is linear in v: value channel d (mixed over the keys) becomes output channel d.
    """
    args = op_args(node)
    q, k, v = args["query"], args["key"], args["value"]
    rest = [x for name, x in args.items() if name not in ("query", "key", "value")]
    blocked = a.taint_args(flat_list(rest))  # masks and the like: the scores must not move
    lk, lv = _gqa_heads(a, node, q, k), _gqa_heads(a, node, q, v)
    site = None if lk is None else _contraction_site(a, node, q, k, y_transposed=False, y_labels=lk)
    if site is not None:
        site.blocked_as = None if blocked else f"{opname(node)} (queries, keys)"
        a.contraction_sites.append(site)
    elif a.taint_args((q, k)):
        blocked = True
    if blocked:
        a.note_blocked(node, f"{opname(node)} (queries, keys)")
    if lv is None:  # heads that do not divide: the values cannot be followed
        a.taint_args((v,))
        return invariant_label(ndim_of(node))
    if not live(lv):
        return invariant_label(ndim_of(node))
    out = fit(collapse(a.uf, lv, [lv.ndim - 2]), ndim_of(node))
    text = f"{opname(node)} ({node.name}): output channel d = attention-weighted sum of value channel d over the keys"
    for slot in slots_in(out):
        a.couplings.append((slot, text))
    return out


def _gqa_heads(a: Analysis, node: Node, q: Any, kv: Any) -> Tensor | None:
    """The labels of a key or value input as the query heads see them (None if they cannot be matched).

    With `enable_gqa=True`, key/value head j serves query heads j * r .. (j + 1) * r - 1 (r = query heads / key
    heads, torch's repeat_interleave): the labels are repeated the same way along the head dim (-3).
    """
    lab = a.lab(kv, ndim_of(kv))
    if not bool(op_args(node).get("enable_gqa", False)):
        return lab
    sq, sk = shape_of(q), shape_of(kv)
    if len(sq) < 3 or len(sk) < 3 or sq[-3] % sk[-3]:
        return None
    rep = sq[-3] // sk[-3]
    if rep == 1 or lab.shape[-3] == 1:
        return lab
    return lab.repeat_interleave(rep, dim=-3)


Use = tuple[int, int, int, int]
"""(site number, contraction coordinate c, query class root, key class root)."""


def _class_ok(r: int, contribs: dict[int, list[Contribution]], normalised: set[int]) -> bool:
    """A query or key class that can move alone: written only by slices of one layer's parameters, neither read
    nor normalised anywhere. (Additions and concatenations on the way are fine: what they mix is in the class,
    or taints it; a rotary embedding's `q cos + rotate_half(q) sin` joins coordinates c and c + d/2.)"""
    cs = contribs.get(r, [])
    return (bool(cs) and r not in normalised and all(x.role == "in" for x in cs)
            and len({module_of(x.param) for x in cs}) == 1)


def _components(uses: set[Use]) -> list[set[Use]]:
    """The uses grouped into connected components of the bipartite graph query class -- key class."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, _, rq, rk in uses:
        parent[find(("q", rq))] = find(("k", rk))
    comps: dict[tuple[str, int], set[Use]] = {}
    for use in uses:
        comps.setdefault(find(("q", use[2])), set()).add(use)
    return list(comps.values())


def resolve_contractions(a: Analysis) -> None:
    """Turn the recorded contraction sites into `QKPair`s, then taint every query and key slot.

    Runs once every op has been labelled, when the classes are final. Every (coordinate, query class, key
    class) met at a contraction is an edge of a bipartite graph between query classes and key classes; each
    connected component is one candidate pair: scaling all its query classes by alpha and all its key
    classes by 1/alpha changes no term of any score, because every term with a query class of the component
    has its key class in the component and vice versa. It is a `QKPair` when no class of it is used on both
    sides (a Gram matrix x x^T), every class moves alone (`_class_ok`), and no slot of it is joined to its
    class inversely (a tied parameter). Sites with a component that does not qualify count as blocked.
    What the class meets elsewhere is in the union-find already: a reader or a normaliser shows in its
    contributions, an addition or a reduction unites what it mixes, anything else taints it.
    """
    if not a.contraction_sites:
        return
    uf = a.uf
    everything: set[Use] = set()
    mixed: set[int] = set()
    for i, site in enumerate(a.contraction_sites):
        for c, sq, sk in site.pairs:
            (rq, pq), (rk, pk) = uf.find_parity(sq), uf.find_parity(sk)
            everything.add((i, c, rq, rk))
            mixed |= {r for r, p in ((rq, pq), (rk, pk)) if p}
    queries = {u[2] for u in everything}
    keys = {u[3] for u in everything}
    roots = (queries | keys) - {INVARIANT}
    contribs = oriented_classes(a, roots)
    mixed |= {r for r in roots if any(uf.find_parity(x.slot)[1] for x in contribs.get(r, ()))}
    normalised = {r for r in (uf.find(s) for s in a.normalised) if r in roots}
    failed_sites: set[int] = set()
    for comp in sorted(_components(everything), key=lambda uses: min(uses)):
        qs = sorted({u[2] for u in comp})
        ks = sorted({u[3] for u in comp})
        ok = (INVARIANT not in qs and INVARIANT not in ks and not (set(qs) & keys) and not (set(ks) & queries)
              and not (set(qs) | set(ks)) & mixed and all(_class_ok(r, contribs, normalised) for r in (*qs, *ks)))
        if not ok:
            failed_sites |= {u[0] for u in comp}
            continue
        coords = tuple(sorted({u[1] for u in comp}))
        sites = sorted({a.contraction_sites[u[0]].what for u in comp})
        how = []
        if len(coords) > 1:
            how.append(f"coordinates {list(coords)} move together (joined before the contraction, e.g. by a "
                       "rotary embedding)")
        if len(qs) > len(ks):
            how.append(f"{len(ks)} key class(es) shared by {len(qs)} query classes (e.g. grouped-query attention)")
        a.qk_pairs.append(QKPair(
            [x for r in qs for x in contribs[r]], [x for r in ks for x in contribs[r]], coords,
            f"{', '.join(sites)}: score = sum_c q_c k_c: query channels c in {list(coords)} (x alpha) with key "
            "channels c (x 1/alpha) leave every score unchanged; both reach it only through index maps and "
            "positively homogeneous ops" + ("; " + "; ".join(how) if how else "")))
    for i in sorted(failed_sites):
        site = a.contraction_sites[i]
        if site.blocked_as is not None:
            a.note_blocked(site.node, site.blocked_as)
    for site in a.contraction_sites:
        for s in site.slots:
            uf.union(INVARIANT, s)


define("_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention_for_cpu",
       "_scaled_dot_product_efficient_attention", channel=None, shift=Shift.ATTENTION_KEY, family="attention",
       summary="barrier (an attention kernel's internals); attention-key sink for the translation engine")
