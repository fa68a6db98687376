"""Translation symmetries: parameters whose change shifts every logit of a sample by the same amount.

softmax(z + s 1) = softmax(z) for any per-sample scalar s. A Linear/Conv writer W (out, in, ...) with
output z: adding alpha to column W[:, j] (every output channel) adds alpha * x_j to every channel of
z, a shift that is constant along the channel axis (and varies along everything else); adding alpha
to the whole bias adds alpha to every channel. Hence one group per input feature/channel j plus one
for the bias, provided the shift reaches a softmax over exactly that axis through ops that keep "a
shift constant along the class axis" constant along it: index maps that carry the axis along (view,
flatten, permute...), linear reductions over other axes (mean, average pooling), additions with
other branches and scalar factors. ReLU, max-pooling, dropout masks, per-channel affine maps or any
other use of the writer's output break it, and every use must lead to the softmax.

What each op does to such a shift is the `Shift` kind of its record in the op-rule table (ops/registry.py),
the same table the channel rules come from; `STEPS` says how each kind is followed. Attention key biases
(key_bias.py) are the same idea one level down: a shift of the keys, harmless to the softmax over keys.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, module_of, ndim_of, replay_op, shape_of, zeros_like_val
from neural_mechanics.symmetry.graph import compress
from neural_mechanics.symmetry.ops import Flag, Shift, canonical, op_args, rule_of, shift_kind
from neural_mechanics.symmetry.ops.elementwise import spatial_dims
from neural_mechanics.symmetry.ops.linear import shift_source
from neural_mechanics.symmetry.ops.sinks import softmax_dim

Memo = dict[tuple[Node, int], bool]


@dataclass(frozen=True)
class TranslationSite:
    """A writer whose output reaches a softmax as a per-sample shift."""

    node: Node
    weight: str | None
    bias: str | None
    n_in: int
    path: tuple[str, ...]
    in_dim: int = 1
    """The weight dim whose slice j is one group (1 for Linear/Conv, 0 for addmm and transposed convs)."""


def _replay_rows(node: Node, user: Node, dim: int) -> Any:
    """Run `user` with `node` replaced by its row labels (1 + the index of each fibre along `dim`).

    Returns a tensor (or a list of them) whose entry is the row label of the entry of `node` it came from,
    or 0 where it holds a constant or another input's value (which carries no shift). The op is replayed
    twice, with labels r and r + K: an entry moved from `node` differs by exactly K, a constant (padding)
    or another input (zeros here) does not change; None if the op cannot run on labels.
    """
    shape = shape_of(node)
    rows_shape = [s for i, s in enumerate(shape) if i != dim]
    n = 1
    for s in rows_shape:
        n *= s
    rows = torch.arange(1, n + 1, dtype=torch.float64).view(rows_shape).unsqueeze(dim).expand(shape).contiguous()
    k = float(2 ** (n.bit_length() + 1))

    def run(labels: Tensor) -> Any:
        return replay_op(user, lambda x, v: labels if x is node else zeros_like_val(x, v))

    try:
        first, second = run(rows), run(rows + k)
    except Exception:
        return None

    def moved(a: Any, b: Any) -> Any:
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            return torch.where(b - a == k, a, torch.zeros_like(a))
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return [moved(x, y) for x, y in zip(a, b, strict=True)]
        return None

    return moved(first, second)


def _carried_dims(labels: Any) -> list[int]:
    """Dims (of size > 1) along which every fibre of the replayed row labels holds one row: the shift's axes."""
    if not isinstance(labels, Tensor):
        return []
    comp = compress(labels)
    return [d for d in range(labels.ndim) if labels.shape[d] > 1 and comp.shape[d] == 1]


# ---- one step per shift kind: does a shift of `node` constant along `dim` survive its use `u`? ----------
Step = Callable[[Node, Node, int, list[str], Memo], bool]


def _softmax(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    ok = op_args(u)["input"] is node and softmax_dim(u) == dim
    if ok:
        path.append(f"{u.target}: softmax over dim {dim} is invariant to a per-sample shift of the logits")
    return ok


def _carried(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    return shift_reaches_softmax(u, dim, path, memo)


def _sum(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    return shift_reaches_softmax(u, dim + ndim_of(u) - ndim_of(node), path, memo)


def _scalar_factor(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    """x * c, x / c, c * x with c not a graph value (a divisor that moves is not a factor)."""
    args = op_args(u)
    x, other = args["input"], args.get("other")
    ok = (x is node and not isinstance(other, Node)) or (
        canonical(u) == "aten::mul" and other is node and not isinstance(x, Node))
    return ok and shift_reaches_softmax(u, dim, path, memo)


def _linear_reduce(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    nd = ndim_of(node)
    args = op_args(u)
    dims = args.get("dim")
    keep = bool(args.get("keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims or range(nd))
    dims = [d % nd for d in dims]
    return dim not in dims and shift_reaches_softmax(u, dim if keep else dim - sum(d < dim for d in dims), path, memo)


def _linear_pool(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    return dim < ndim_of(node) - spatial_dims(u) and shift_reaches_softmax(u, dim, path, memo)


def _index_map(node: Node, u: Node, dim: int, path: list[str], memo: Memo) -> bool:
    """Replay the map on row labels; a multi-output map (split, unbind) is followed through its getitems.

    An output nobody reads (the getitem of an unused chunk) carries the shift nowhere and is skipped.
    """
    out = _replay_rows(node, u, dim)
    used = [g for g in u.users if g.users]
    if isinstance(out, Tensor):
        ok = any(shift_reaches_softmax(u, d, path, memo) for d in _carried_dims(out))
    elif isinstance(out, list) and used and all(
            g.target is operator.getitem and isinstance(g.args[1], int) for g in u.users):
        ok = all(any(shift_reaches_softmax(g, d, path, memo) for d in _carried_dims(out[g.args[1]]))  # type: ignore[index]
                 for g in used)
    else:
        ok = False
    if ok:
        path.append(f"{u.target} carries the class axis along")
    return ok


STEPS: dict[Shift, Step] = {
    Shift.SOFTMAX: _softmax,
    Shift.SAME: _carried,
    Shift.SUM: _sum,
    Shift.SCALAR_FACTOR: _scalar_factor,
    Shift.LINEAR_REDUCE: _linear_reduce,
    Shift.LINEAR_POOL: _linear_pool,
    Shift.INDEX_MAP: _index_map,
}
"""How the softmax translation follows each shift kind (the attention kinds stop it: they are key-bias sinks)."""


def shift_reaches_softmax(node: Node, dim: int, path: list[str], memo: Memo) -> bool:
    """True if a shift of `node` constant along `dim` leaves every downstream use invariant."""
    key = (node, dim)
    if key in memo:
        return memo[key]
    memo[key] = False
    if not node.users:
        return False
    ok = True
    for u in node.users:
        kind = shift_kind(u)
        step = STEPS.get(kind) if kind is not None else None
        ok = step is not None and step(node, u, dim, path, memo)
        if not ok:
            break
    memo[key] = ok
    return ok


def _any_kind(node: Node) -> Shift | None:
    """The node's shift kind whatever its condition (a cheap superset for `_reaching`)."""
    rule = rule_of(node)
    return None if rule is None or rule.shift is None else rule.shift.kind


def reaching(graph: torch.fx.Graph, targets: set[Shift], through: set[Shift]) -> set[Node]:
    """Nodes with a path to an op of a kind in `targets` along which every op in between has a kind in `through`.

    A cheap necessary condition that prunes the label replays: a writer outside this set cannot reach a
    softmax (or an attention score) through the ops that could carry its shift there.
    """
    stack = [n for n in graph.nodes if _any_kind(n) in targets]
    seen: set[Node] = set()
    while stack:
        n = stack.pop()
        for x in n.all_input_nodes:
            if x in seen:
                continue
            seen.add(x)
            if _any_kind(x) in through:
                stack.append(x)
    return seen


SOFTMAX_THROUGH: set[Shift] = {kind for kind in STEPS if kind is not Shift.SOFTMAX}


def find_translation_sites(a: Analysis) -> list[TranslationSite]:
    """Linear/addmm/Conv writers (ungrouped, `Flag.SHIFT_SOURCE`) whose output reaches a softmax only as a shift."""
    graph = a.cap.graph
    if not any(_any_kind(n) is Shift.SOFTMAX for n in graph.nodes):
        return []
    reach = reaching(graph, {Shift.SOFTMAX}, SOFTMAX_THROUGH)
    sites = []
    for node in graph.nodes:
        rule = rule_of(node)
        if rule is None or Flag.SHIFT_SOURCE not in rule.flags or node not in reach:
            continue
        parts = shift_source(node)
        if parts is None:
            continue
        wname, bname = a.param_name(parts.weight), a.param_name(parts.bias)
        if wname is None:
            continue
        dim = parts.class_dim
        path: list[str] = []
        if not shift_reaches_softmax(node, dim, path, {}):
            continue
        sites.append(TranslationSite(
            node=node,
            weight=wname if a.alone(wname) else None,
            bias=bname if a.alone(bname) else None,
            n_in=shape_of(parts.weight)[parts.in_dim],
            path=(f"{module_of(wname)}: {node.target} writes the logits (class axis = dim {dim})",
                  *dict.fromkeys(reversed(path))),
            in_dim=parts.in_dim,
        ))
    return sites
