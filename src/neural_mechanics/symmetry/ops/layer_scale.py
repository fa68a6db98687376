"""Layer scale: the product of an activation with a parameter (`gamma * x`, `gamma.view(-1, 1, 1) * x`).

out = p * x is linear in x through p's elements and linear in p: p[i] reads every slot it multiplies
(united, their scale absorbed by p[i] / alpha) and writes a fresh output slot i (p[i] * alpha scales it).
A parameter may reach the product through single-input rearrangements (`Flag.REARRANGE`: view,
unsqueeze, permute...); `find_scale_chains` finds those chains before the rules run, and the product
replays them on the parameter's element numbers to know which element multiplies which position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import (
    Analysis,
    Contribution,
    Labels,
    module_of,
    ndim_of,
    opname,
    replay_op,
    shape_of,
    zeros_like_val,
)
from neural_mechanics.symmetry.graph import compress, fit, invariant_label
from neural_mechanics.symmetry.ops.registry import Flag, canonical, rule_of


def _rearranges(node: Node) -> bool:
    rule = rule_of(node)
    return rule is not None and Flag.REARRANGE in rule.flags


def find_scale_chains(graph: torch.fx.Graph, params: dict[Node, str], live_nodes: set[Node]) -> dict[Node, Any]:
    """Parameters reshaped before a product (`gamma.view(-1, 1, 1) * x`): chain end -> (param, chain nodes).

    The parameter and every node of the chain must have exactly one live use, and the chain must end in a
    `mul`: then the product is a layer scale of the parameter's elements (see `layer_scale_product`).
    """
    out: dict[Node, Any] = {}
    for pnode in params:
        cur: Node = pnode
        chain: list[Node] = []
        while True:
            users = [u for u in cur.users if u in live_nodes]
            if len(users) != 1 or users[0].op != "call_function":
                break
            u = users[0]
            if _rearranges(u) and u.args and u.args[0] is cur:
                chain.append(u)
                cur = u
                continue
            if canonical(u) == "aten::mul" and chain:
                out[chain[-1]] = (pnode, chain)
            break
    return out


def _replay_chain(pnode: Node, chain: list[Node]) -> Tensor:
    """Element numbers of the parameter (row-major) carried through the chain's rearrangements.

    Any other graph value a rearrangement reads (view_as's target) only lends its shape: zeros of it.
    """
    shape = shape_of(pnode)
    t = torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float64).view(shape)
    for c in chain:
        src, cur = c.args[0], t

        def value(x: Node, v: Tensor, src: Any = src, cur: Tensor = cur) -> Tensor:
            return cur if x is src else zeros_like_val(x, v)

        t = replay_op(c, value)
    return compress(t.to(torch.long))


def layer_scale_product(a: Analysis, node: Node, x: Node, y: Node) -> Labels | None:
    """Labels of `x * y` when one factor is a parameter (or the end of its chain); None when neither is.

    A parameter that cannot move (frozen, shared) is a constant factor: the other factor passes through.
    """
    nd = ndim_of(node)
    for p, other in ((y, x), (x, y)):
        if p in a.scale_chains and p is not other:  # gamma.view(...) * x
            pnode, chain = a.scale_chains[p]
            pname = a.cap.params[pnode]
            if a.usable(pname):
                return _layer_scale(a, node, pnode, pname, other, _replay_chain(pnode, chain), chain)
            return a.lab(other, nd)
        name = a.param_name(p)
        if name is not None and p not in a.env and p is not other:
            if a.usable(name):
                return _layer_scale(a, node, p, name, other)
            return a.lab(other, nd)  # a parameter that never moves is a constant factor
    return None


def _layer_scale(a: Analysis, node: Node, p: Node, name: str, x: Node, elems: Tensor | None = None,
                 chain: list[Node] | None = None) -> Labels:
    """out = p * x: p[i] reads every slot it multiplies (united) and writes a fresh slot i.

    `elems` (a reshaped parameter): the parameter element multiplying each position, row-major; element e
    belongs to slice i = (e // stride_d) % size_d along the parameter's last dimension d of size > 1.
    """
    nd = ndim_of(node)
    pshape = shape_of(p)
    dims = [d for d, s in enumerate(pshape) if s > 1]
    layer = module_of(name)
    if not dims:
        idx = torch.zeros((1,) * nd, dtype=torch.long)
        n, d = 1, None
    else:
        d = dims[-1]
        n = pshape[d]
        if elems is not None:
            stride = int(torch.tensor(pshape[d + 1 :]).prod()) if d + 1 < len(pshape) else 1
            idx = fit((elems // stride) % n, nd)
        else:
            view = [1] * len(pshape)
            view[d] = n
            idx = fit(torch.arange(n).view(view), nd)
    lx = a.lab(x, nd)
    lx2, idx2 = torch.broadcast_tensors(lx, idx)
    pairs = torch.unique(torch.stack([idx2.reshape(-1), lx2.reshape(-1)], 1), dim=0).tolist()
    read: dict[int, list[int]] = {}
    for i, lab in pairs:
        read.setdefault(int(i), []).append(int(lab))
    base = a.uf.new(n)
    how = f"{opname(node)} by {name}" + (f" (through {', '.join(opname(c) for c in chain)})" if chain else "")
    reads, writes = f"{layer}: {how} reads {{idx}}", f"{layer}: {how} writes {{idx}}"
    for i in range(n):
        rep = a.uf.union_all(read.get(i, ()))
        member = (d, None if d is None else (i,))
        if rep is not None and rep > 0:
            a.contributions.append(Contribution(rep, name, member[0], member[1], "out", reads))
        a.contributions.append(Contribution(base + i, name, member[0], member[1], "in", writes))
    a.env[p] = invariant_label(len(pshape))
    return base + idx
