"""Hand-written RMS normalisation, recognised by graph structure: `x * rsqrt(mean(x**2, dims, keepdim) + eps)`.

LLaMA, Qwen2, Mistral (LlamaRMSNorm) and T5 (T5LayerNorm) do not call `aten.rms_norm`: they compute

    v = mean(x.float() ** 2, dim=-1, keepdim=True);   y = x * rsqrt(v + eps);   out = weight * y

so the graph holds pow / mean / add / rsqrt / mul. Each of those alone is either a barrier (pow, rsqrt) or
homogeneous, so the residual stream would lose its scale group at the first norm. Together they are a
normaliser: y(alpha x) = y(x) for alpha > 0 when every entry of a row (the reduced dims) scales together (up
to eps, like LayerNorm's eps: negligible against the row's mean square).

`find_rms_norms` finds the pattern before the rules run, from the graph alone (no module names):
- the statistic: `pow(t, 2)` / `square(t)` / `mul(t, t)`, then `mean(., dims, keepdim=True)`, optionally
  `+ eps` (a constant >= 0), then `rsqrt` (or `pow(., -0.5)`), multiplied into x; or `sqrt` divided into x;
- x and t are the same node up to float casts (`x.to(torch.float32)` on one side or both);
- every node of the statistic is used only inside the pattern (a statistic that leaks elsewhere moves with
  x, and would need its own rule).
The normalising product then unites x's slots over the reduced dims, records them as normalised, and writes
nothing that moves (`rms_normalise`); the statistic's nodes do not taint x (rules.py skips them). A
following `weight * y` is a layer-scale product of an unmoving y: weight[d] writes feature d, the affine
writer of the norm (layer_scale.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, Labels, ndim_of, shape_of
from neural_mechanics.symmetry.graph import collapse, invariant_label, slots_in
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.registry import op_key


@dataclass(frozen=True)
class RmsNorm:
    """One recognised RMS normalisation: `node` (the product or quotient) normalises `x` over `dims`."""

    node: Node
    x: Node
    dims: tuple[int, ...]
    statistic: tuple[Node, ...]
    """The nodes that compute the statistic (skipped by the rules: they feed only this normaliser)."""


_CASTS = ("aten::_to_copy", "aten::to", "aten::type_as")


def canonical(node: Node) -> str | None:
    """The op's qualified name ("aten::rsqrt"), whether or not it has a rule (rsqrt and pow have none)."""
    return op_key(node.target) if node.op == "call_function" else None


def strip_casts(node: object) -> object:
    """The node before any chain of floating-point dtype casts (`x.to(torch.float32)`)."""
    while isinstance(node, Node) and canonical(node) in _CASTS:
        src = op_args(node).get("input")
        v_in = src.meta.get("val") if isinstance(src, Node) else None
        v_out = node.meta.get("val")
        if not (isinstance(v_in, Tensor) and isinstance(v_out, Tensor) and v_in.dtype.is_floating_point
                and v_out.dtype.is_floating_point and v_in.shape == v_out.shape):
            break
        node = src
    return node


def _square_of(node: object) -> Node | None:
    """t when `node` is t ** 2, square(t) or t * t."""
    key = canonical(node) if isinstance(node, Node) else None
    if key not in ("aten::pow", "aten::square", "aten::mul"):
        return None
    args = op_args(node)  # type: ignore[arg-type]
    if key == "aten::pow" and isinstance(args.get("input"), Node) and args.get("exponent") in (2, 2.0):
        return args["input"]
    if key == "aten::square" and isinstance(args.get("input"), Node):
        return args["input"]
    if key == "aten::mul" and isinstance(args.get("input"), Node) and args.get("other") is args.get("input"):
        return args["input"]
    return None


def _mean_square(v: object) -> tuple[Node, tuple[int, ...], list[Node]] | None:
    """(t, reduced dims, statistic nodes) when `v` is mean(t**2, dims, keepdim=True) [+ eps >= 0]."""
    chain: list[Node] = []
    if isinstance(v, Node) and canonical(v) == "aten::add":
        args = op_args(v)
        eps, alpha = args.get("other"), args.get("alpha", 1)
        if isinstance(eps, Node) or not isinstance(eps, (int, float)) or eps < 0 or alpha != 1:
            return None
        chain.append(v)
        v = args["input"]
    if not (isinstance(v, Node) and canonical(v) == "aten::mean"):
        return None
    args = op_args(v)
    sq = args.get("input")
    t = _square_of(sq)
    dims = args.get("dim")
    if t is None or not bool(args.get("keepdim", False)) or dims is None or shape_of(t) != shape_of(v.args[0]):
        return None
    nd = ndim_of(t)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not dims:
        return None
    return t, tuple(sorted({int(d) % nd for d in dims})), [*chain, v, sq]  # type: ignore[list-item]


def _inverse_root(r: Node) -> tuple[object, Node, bool] | None:
    """(variance expression, root node, divide) for rsqrt(v) / v ** -0.5 (multiplied in) or sqrt(v) (divided)."""
    key = canonical(r)
    if key not in ("aten::rsqrt", "aten::pow", "aten::sqrt"):
        return None
    args = op_args(r)
    if key == "aten::rsqrt":
        return args.get("input"), r, False
    if key == "aten::pow" and args.get("exponent") in (-0.5,):
        return args.get("input"), r, False
    if key == "aten::sqrt":
        return args.get("input"), r, True
    return None


def find_rms_norms(graph: torch.fx.Graph, live_nodes: set[Node]) -> dict[Node, RmsNorm]:
    """Every product `x * rsqrt(mean(x**2) + eps)` (or quotient by sqrt) of the graph, keyed by that node."""
    found: dict[Node, RmsNorm] = {}
    for node in graph.nodes:
        if node not in live_nodes or canonical(node) not in ("aten::mul", "aten::div"):
            continue
        args = op_args(node)
        pair = [args.get("input"), args.get("other")]
        for x, r in (pair, pair[::-1]):
            if not (isinstance(x, Node) and isinstance(r, Node)):
                continue
            root = _inverse_root(r)
            if root is None or root[2] != (canonical(node) == "aten::div") or (root[2] and r is not pair[1]):
                continue
            ms = _mean_square(root[0])
            if ms is None:
                continue
            t, dims, chain = ms
            statistic = (*chain, root[1])
            if strip_casts(t) is not strip_casts(x) or shape_of(x) != shape_of(node):
                continue
            inside = {*statistic, node}
            if not all(set(s.users) <= inside | ({u for u in s.users if u not in live_nodes}) for s in statistic):
                continue
            found[node] = RmsNorm(node, x, dims, statistic)
            break
    return found


def rms_normalise(a: Analysis, norm: RmsNorm) -> Labels:
    """x * rsqrt(mean(x**2) + eps) does not move when each row of x (the reduced dims) scales as one: unite, record."""
    nd = ndim_of(norm.node)
    lab = collapse(a.uf, a.lab(norm.x, nd), list(norm.dims))
    for s in slots_in(lab):
        a.normalised.setdefault(s, []).append(
            f"{norm.node.name}: x * rsqrt(mean(x^2, dim {list(norm.dims)}) + eps) normalises those dims jointly "
            "(RMS norm)")
    return invariant_label(nd)
