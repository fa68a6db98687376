"""Attention key biases: Linear bias coordinates whose only effect is a shift of the keys, a translation group.

q_i . (k_j + delta) = q_i . k_j + q_i . delta: a shift delta of the keys that is the same for every key adds
a per-query constant to the scores, which the softmax over the keys ignores. A dense layer's bias coordinate j
(Linear, or GPT-2's Conv1D addmm) adds b_j to feature j of every token; when feature j reaches attention only
as keys (through index maps and copies, or scaled by a constant), each such coordinate is a translation group
of its own. The ops followed, and the two sinks (`scaled_dot_product_attention`'s key, the right factor of
q @ k^T), are the `Shift` kinds of their records in the op-rule table (ops/registry.py); the scores of an
explicit q @ k^T must then reach a softmax over the keys as a shift (translation.py's
`shift_reaches_softmax`). A rotary embedding multiplies the keys by position-dependent cos/sin (graph
values, not constants): the rotated bias is not constant over positions, and the search stops there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, module_of, ndim_of, replay_op, shape_of, zeros_like_val
from neural_mechanics.symmetry.ops import Shift, canonical, op_args, shift_kind
from neural_mechanics.symmetry.ops.attention import factors
from neural_mechanics.symmetry.ops.linear import shift_source
from neural_mechanics.symmetry.translation import reaching, shift_reaches_softmax

KEY_SINKS: set[Shift] = {Shift.ATTENTION_KEY, Shift.SCORES}
KEY_THROUGH: set[Shift] = {Shift.INDEX_MAP, Shift.SAME, Shift.SCALAR_FACTOR}
"""The shift kinds the key-bias search follows (labels replayed or carried) and ends at."""


@dataclass(frozen=True)
class KeyBiasSite:
    """Bias coordinates of a Linear whose only effect is a per-query constant added to attention scores."""

    node: Node
    bias: str
    coords: tuple[int, ...]
    path: tuple[str, ...]


def _replay(user: Node, env: dict[Node, torch.Tensor]) -> object:
    """Run an index map on coordinate labels (tracked inputs) and zeros (every other tensor input)."""
    return replay_op(user, lambda x, v: env[x] if x in env else zeros_like_val(x, v))


def _constant_along(lab: torch.Tensor, dim: int) -> bool:
    """True if every fibre of `lab` along `dim` holds one value (a shift of it is constant along `dim`)."""
    if lab.ndim == 0 or lab.shape[dim] <= 1:
        return True
    return bool((lab == lab.narrow(dim, 0, 1)).all())


def key_bias_coordinates(node: Node, n: int, path: list[str]) -> set[int]:
    """Output features j of a Linear (`node`, n features) whose constant shift reaches attention only as keys.

    Feature j's shift delta_j e_j (the same for every token) is followed through index maps (view, permute,
    select, split, ...), copies and products with a constant (`k * scale`) on label tensors (entry = feature
    index + 1). It is harmless where it enters
    - `scaled_dot_product_attention` as the key, constant along the key axis (dim -2): the scores
      q_i . (k_j + delta) = q_i . k_j + q_i . delta change by a per-query constant, which the softmax over
      keys ignores (additive masks, causal masks and dropout after the softmax do not change that);
    - `matmul(q, k^T)` as the right factor, constant along its last (key) axis, when the scores then reach
      a softmax over that axis only through shift-preserving ops (`shift_reaches_softmax`).
    A feature that reaches anything else (query, value, a nonlinearity, the output) is excluded.
    """
    shape = shape_of(node)
    if not shape or shape[-1] != n:
        return set()
    env: dict[Node, torch.Tensor] = {
        node: torch.arange(1, n + 1, dtype=torch.float64).expand(shape).contiguous()}
    order = {x: i for i, x in enumerate(node.graph.nodes)}
    good: set[int] = set()
    bad: set[int] = set()
    frontier = sorted({u for u in node.users}, key=order.__getitem__)
    seen: set[Node] = set()

    def labels_of(x: torch.Tensor) -> set[int]:
        present = torch.zeros(n + 1, dtype=torch.bool).index_fill_(0, x.reshape(-1).long(), True)
        return {int(v) - 1 for v in present.nonzero().reshape(-1).tolist() if v > 0}

    while frontier:
        u = frontier.pop(0)
        if u in seen:
            continue
        seen.add(u)
        tracked = [x for x in u.all_input_nodes if x in env]
        kind = shift_kind(u)
        verdict: bool | None = None  # True good, False bad, None propagated
        val: object = None
        if u.op == "call_function" and u.target is operator.getitem:
            src = u.args[0]
            val = env.get(src)  # type: ignore[arg-type]
            if isinstance(val, (list, tuple)):
                env[u] = val[u.args[1]]  # type: ignore[index]
            else:
                verdict = False
        elif kind in KEY_THROUGH:
            if kind is Shift.SAME:
                val = env[tracked[0]] if u.args[0] in env and len(tracked) == 1 else None
            elif kind is Shift.SCALAR_FACTOR:  # k * c, k / c: the shift is scaled, still constant over the keys
                x, other = op_args(u)["input"], op_args(u).get("other")
                if isinstance(other, Node) and canonical(u) == "aten::mul" and not isinstance(x, Node):
                    x, other = other, x
                val = env[x] if x in env and not isinstance(other, Node) and len(tracked) == 1 else None
            else:
                try:
                    val = _replay(u, env)
                except Exception:
                    val = None
            if isinstance(val, torch.Tensor):
                env[u] = val.contiguous()
            elif isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
                env[u] = [v.contiguous() for v in val]  # type: ignore[assignment]
            else:
                verdict = False
        elif kind is Shift.ATTENTION_KEY:
            args = op_args(u)
            key = args.get("key")
            q_v = [x for x in tracked if x is args.get("query") or x is args.get("value")]
            for x in q_v:
                bad |= labels_of(env[x])
            if isinstance(key, Node) and key in env:
                lab = env[key]
                if _constant_along(lab, -2):
                    good |= labels_of(lab)
                    path.append(f"{u.target}: the keys' shift adds q . delta to every score of a query "
                                "(constant over keys), which the softmax over keys ignores")
                else:
                    bad |= labels_of(lab)
            for x in tracked:
                if x is not key and x not in q_v:
                    bad |= labels_of(env[x])
            continue
        elif kind is Shift.SCORES and isinstance(factors(u)[1], Node) and factors(u)[1] in env:
            left, right = factors(u)
            if left in env:  # the queries come from the same layer (a packed qkv): their features are not keys
                bad |= labels_of(env[left])
            lab = env[right]
            sub_path: list[str] = []
            if left is not right and _constant_along(lab, -1) and shift_reaches_softmax(
                    u, ndim_of(u) - 1, sub_path, {}):
                good |= labels_of(lab)
                path.append(f"{u.target}: scores q . (k + delta) change by q . delta, constant over keys")
                path.extend(dict.fromkeys(reversed(sub_path)))
            else:
                bad |= labels_of(lab)
            continue
        else:
            verdict = False
        if verdict is False:
            for x in tracked:
                v = env[x]
                for t in (v if isinstance(v, (list, tuple)) else [v]):
                    bad |= labels_of(t)
            continue
        frontier.extend(x for x in u.users if x not in seen)
        frontier.sort(key=order.__getitem__)
    return good - bad


def find_key_bias_sites(a: Analysis) -> list[KeyBiasSite]:
    """Dense-layer biases (Linear, addmm; usable, used once) with coordinates that only ever shift attention keys."""
    reach = reaching(a.cap.graph, KEY_SINKS, KEY_THROUGH)
    sites = []
    for node in a.cap.graph.nodes:
        if canonical(node) not in ("aten::linear", "aten::addmm") or node not in reach:
            continue
        parts = shift_source(node)
        b = None if parts is None else parts.bias
        bname = a.param_name(b)
        if bname is None or not a.alone(bname):
            continue
        n = shape_of(b)[0] if len(shape_of(b)) == 1 else 0
        path: list[str] = []
        coords = key_bias_coordinates(node, n, path)
        if coords:
            sites.append(KeyBiasSite(node, bname, tuple(sorted(coords)), (
                f"{module_of(bname)}: {node.target} adds {bname}[j] to output feature j of every token",
                *dict.fromkeys(path))))
    return sites
