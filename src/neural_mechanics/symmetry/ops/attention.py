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
from torch.fx import Node

from neural_mechanics.symmetry.analysis import (
    Analysis,
    Contribution,
    Labels,
    flat_list,
    module_of,
    ndim_of,
    opname,
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
    """A query channel class and a key channel class met only at one contraction coordinate.

    Scaling the query writers by alpha and the key writers by 1/alpha (alpha > 0) scales q_{.,c} by alpha
    and k_{.,c} by 1/alpha, which leaves every score sum_c q_{i,c} k_{j,c} (and so the loss) unchanged.
    """

    query: list[Contribution]
    key: list[Contribution]
    coord: int
    text: str


def _contraction_site(a: Analysis, node: Node, x: Any, y: Any, y_transposed: bool) -> ContractionSite | None:
    """The site of sum_c x[..., i, c] y[..., j, c] (y[..., c, j] when `y_transposed`), or None if unpaired.

    Paired means: both factors are live and, at every batch/head position, query channel c carries one live
    slot over all query tokens i and key channel c one live slot over all key tokens j; then scaling that
    query slot by alpha and that key slot by 1/alpha leaves every term q_{i,c} k_{j,c} unchanged.
    """
    sx, sy = shape_of(x), shape_of(y)
    if len(sx) < 2 or len(sy) < 2:
        return None
    lx, ly = a.lab(x, len(sx)), a.lab(y, len(sy))
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
    qx, ky = lx.narrow(-2, 0, 1), ly.narrow(-2, 0, 1)
    if not (bool((lx == qx).all()) and bool((ly == ky).all())):
        return None  # a channel carries different slots over the tokens (a coarser joint action: not tried)
    qx, ky = qx.squeeze(-2), ky.squeeze(-2)
    if not (bool((qx > 0).all()) and bool((ky > 0).all())):
        return None  # a channel that does not move on one side cannot compensate the other
    coord = torch.arange(n).expand(qx.shape)
    pairs = torch.unique(torch.stack([coord.reshape(-1), qx.reshape(-1), ky.reshape(-1)], 1), dim=0)
    return ContractionSite(node, [(int(c), int(q), int(k)) for c, q, k in pairs.tolist()],
                           slots_in(qx) + slots_in(ky), f"{opname(node)} ({node.name})", opname(node))


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
    if live(lx) and live(ly):
        site = _contraction_site(a, node, x, y, y_transposed=True)
        if site is None:
            return a.barrier(node)
        a.contraction_sites.append(site)
        return invariant_label(nd)
    if live(ly):  # attention @ values: channel d of V stays channel d
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
    gqa = bool(args.get("enable_gqa", False))
    site = None if gqa else _contraction_site(a, node, q, k, y_transposed=False)
    if site is not None:
        site.blocked_as = None if blocked else f"{opname(node)} (queries, keys)"
        a.contraction_sites.append(site)
    elif a.taint_args((q, k)):
        blocked = True
    if blocked:
        a.note_blocked(node, f"{opname(node)} (queries, keys)")
    lv = a.lab(v, ndim_of(v))
    if not live(lv):
        return invariant_label(ndim_of(node))
    out = fit(collapse(a.uf, lv, [lv.ndim - 2]), ndim_of(node))
    text = f"{opname(node)} ({node.name}): output channel d = attention-weighted sum of value channel d over the keys"
    for slot in slots_in(out):
        a.couplings.append((slot, text))
    return out


Use = tuple[int, int, int, int]
"""(site number, contraction coordinate c, query class root, key class root)."""


def _contraction_ok(use: Use, contribs: dict[int, list[Contribution]], uses: dict[int, set[Use]],
                    tied: set[int]) -> bool:
    """Whether the query class and the key class of `use` form a QKPair.

    Each class must be live, distinct from the other, met at exactly this contraction coordinate and on
    this side only (no other site, no other coordinate: rotary embeddings or a q used twice fail here),
    written only by slices of one layer's parameters, and neither read, normalised nor tied by an addition
    or concatenation to anything (`tied`). Cosine attention never gets here: its normalised q and k do not
    move at the contraction.
    """
    _, _, rq, rk = use
    if rq == rk or INVARIANT in (rq, rk) or uses[rq] != {use} or uses[rk] != {use}:
        return False
    for r in (rq, rk):
        cs = contribs.get(r)
        if not cs or r in tied or any(x.role != "in" for x in cs) or len({module_of(x.param) for x in cs}) != 1:
            return False
    return True


def resolve_contractions(a: Analysis) -> None:
    """Turn the recorded contraction sites into `QKPair`s, then taint every query and key slot.

    Runs once every op has been labelled, when the classes are final: `uses` maps every class root to
    the uses it has (as a query or as a key), so a class used twice, or as a query at one site and as a
    key at another, is seen. Sites with a pair that does not qualify count as blocked.
    """
    if not a.contraction_sites:
        return
    uf = a.uf
    uses: dict[int, set[Use]] = {}
    site_uses: list[set[Use]] = []
    for i, site in enumerate(a.contraction_sites):
        found: set[Use] = set()
        for c, sq, sk in site.pairs:
            use = (i, c, uf.find(sq), uf.find(sk))
            found.add(use)
            uses.setdefault(use[2], set()).add(use)
            uses.setdefault(use[3], set()).add(use)
        site_uses.append(found)
    roots = set(uses) - {INVARIANT}
    contribs: dict[int, list[Contribution]] = {}
    for x in a.contributions:
        r = uf.find(x.slot)
        if r in roots:
            contribs.setdefault(r, []).append(x)
    tied = {r for r in (uf.find(s) for s in a.normalised) if r in roots}
    tied |= {r for r in (uf.find(s) for s, _ in a.couplings) if r in roots}
    for site, found in zip(a.contraction_sites, site_uses, strict=True):
        ok_all = True
        for use in sorted(found, key=lambda u: (u[2], u[3], u[1])):
            _, c, rq, rk = use
            if not _contraction_ok(use, contribs, uses, tied):
                ok_all = False
                continue
            a.qk_pairs.append(QKPair(contribs[rq], contribs[rk], c, (
                f"{site.what}: score = sum_c q_c k_c: query channel c = {c} (x alpha) x key channel c = {c} "
                "(x 1/alpha) leaves every score unchanged; both reach it only through index maps and "
                "positively homogeneous ops")))
        if not ok_all and site.blocked_as is not None:
            a.note_blocked(site.node, site.blocked_as)
    for site in a.contraction_sites:
        for s in site.slots:
            uf.union(INVARIANT, s)


define("_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention_for_cpu",
       "_scaled_dot_product_efficient_attention", channel=None, shift=Shift.ATTENTION_KEY, family="attention",
       summary="barrier (an attention kernel's internals); attention-key sink for the translation engine")
