"""Linear layers: linear, convolutions (grouped, transposed), embedding, weight norm. Writers and readers.

- writers make fresh output slots that scale with a parameter slice: row c of a Linear/Conv weight and
  bias[c] write output channel c; column d of an embedding table writes feature d;
- readers are linear in an input channel through a parameter slice (W[:, k] of a Linear/Conv, the
  depthwise rows of group k), which absorbs the channel's scale when divided by alpha.
A parameter that is frozen or used by more than one op never enters a group: a writer or reader whose
parameter cannot be scaled acts as a barrier for that role. Arguments are read by name (ops/args.py), so
`conv2d`, `convolution`, `_convolution` and `conv_transpose2d` share one rule.
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
    invariant_outputs,
    module_of,
    ndim_of,
    opname,
    shape_of,
)
from neural_mechanics.symmetry.graph import compress, invariant_label, live, per_index, taint, union_pairs
from neural_mechanics.symmetry.member import short_index, singletons
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.registry import Flag, canonical, register


def weight_bias(a: Analysis, w: Any, b: Any) -> tuple[str | None, bool, str | None, bool]:
    """(weight name, weight usable, bias name, bias usable or absent)."""
    wname, bname = a.param_name(w), a.param_name(b)
    w_ok = a.usable(wname)
    b_ok = b is None or a.usable(bname)
    return wname, w_ok, bname, b_ok


def write_rows(a: Analysis, base: int, n: int, wname: str, bname: str | None, wevent: str, bevent: str) -> None:
    """Slot base + c is written by wname[c] (and bname[c]) for c < n (dim 0 of both)."""
    add = a.contributions.append
    for c, idx in enumerate(singletons(n)):
        add(Contribution(base + c, wname, 0, idx, "in", wevent))
        if bname is not None:
            add(Contribution(base + c, bname, 0, idx, "in", bevent))


@register("_weight_norm")
def h_weight_norm(a: Analysis, node: Node) -> Labels:
    """normaliser: w = g v / |v| makes each slice v[c] scale-invariant; g[c] writes channel c where w is used."""
    args = op_args(node)
    v, g, dim = args["v"], args["g"], int(args.get("dim", 0))
    vname, gname = a.param_name(v), a.param_name(g)
    if vname is None or gname is None or dim != 0:
        return a.barrier(node)
    if a.usable(vname):
        n = shape_of(v)[0]
        base = a.uf.new(n)
        layer = module_of(vname)
        for c in range(n):
            a.contributions.append(Contribution(base + c, vname, 0, (c,), "in",
                                                f"{layer}: weight norm direction {vname}[{{idx}}]"))
            a.normalised[base + c] = [f"{layer}: {opname(node)} divides {vname}[{c}] by its norm"]
    a.weight_norms[node] = (vname, gname, dim)
    return invariant_outputs(node)


def _weight_norm_layer(a: Analysis, node: Node, x: Any, w: Node, b: Any, n_out: int, cdim: int) -> Labels:
    """A Linear/Conv whose weight is g v / |v|: g[c] (and bias[c]) write channel c; inputs cannot be absorbed."""
    _, gname, _ = a.weight_norms[w]
    bname = a.param_name(b)
    lx = a.lab(x)
    if live(lx):
        a.note_blocked(node, f"{opname(node)} (reads through weight norm)")
        taint(a.uf, lx)
    nd = ndim_of(node)
    if not a.usable(gname) or (b is not None and not a.usable(bname)):
        return invariant_label(nd)
    base, lab = a.fresh(n_out, nd, cdim)
    layer = module_of(gname)
    write_rows(a, base, n_out, gname, bname if b is not None else None,
               f"{layer}: {opname(node)} writes channel {{idx}} (weight norm magnitude {gname}[{{idx}}])",
               f"{layer}: bias[{{idx}}]")
    return lab


def dense(a: Analysis, node: Node, x: Any, w: Any, b: Any, read_dim: int, write_dim: int) -> Labels:
    """A dense layer out[..., c] = sum_k x[..., k] W_k,c + b[c], W stored with k along `read_dim`, c along `write_dim`.

    W's slice k along read_dim reads input feature k (the last axis of x); W's slice c along write_dim and b[c]
    write output feature c (the last axis of the output). Linear stores W as (out, in): read_dim 1, write_dim 0;
    GPT-2's Conv1D (`addmm(b, x, W)`) and `x @ W` store it as (in, out): read_dim 0, write_dim 1.
    """
    wname, w_ok, bname, b_ok = weight_bias(a, w, b)
    computed = isinstance(b, Node) and bname is None  # a bias made in forward: out = x W + b, b an activation
    if computed:
        b, b_ok = None, True
    if wname is None or (b is not None and bname is None):
        return a.barrier(node)
    wshape = shape_of(w)
    c_out, c_in = wshape[write_dim], wshape[read_dim]
    layer = module_of(wname)
    name = opname(node)
    lx = a.lab(x, ndim_of(x))
    if live(lx):
        if w_ok:
            col = "weight[:, {idx}]" if read_dim == 1 else "weight[{idx}]"
            event = f"{layer}: {name} reads feature {{idx}} ({col})"
            add = a.contributions.append
            ones = singletons(c_in)
            for k, s in enumerate(per_index(a.uf, lx, -1, c_in)):
                if s > 0:
                    add(Contribution(s, wname, read_dim, ones[k], "out", event))
        else:
            a.note_blocked(node, f"{name} (frozen weight)")
            taint(a.uf, lx)
    nd = ndim_of(node)
    if not (w_ok and b_ok):
        return invariant_label(nd)
    base, lab = a.fresh(c_out, nd, nd - 1)
    add = a.contributions.append
    wevent = f"{layer}: {name} writes feature {{idx}}"
    for c, idx in enumerate(singletons(c_out)):
        add(Contribution(base + c, wname, write_dim, idx, "in", wevent))
        if b is not None:
            add(Contribution(base + c, bname, 0, idx, "in", f"{layer}: bias[{{idx}}]"))  # type: ignore[arg-type]
    if computed:  # the computed bias is added to the output: its slots meet the written ones, as in x + y
        bias = op_args(node).get("bias", op_args(node).get("input"))
        lb = a.lab(bias, nd)
        text = f"{layer}: {name} ({node.name}) adds a bias computed in forward to feature {{idx}}"
        for s, _t in union_pairs(a.uf, lab, lb):
            a.couplings.append((s, text))
        lab2, lb2 = torch.broadcast_tensors(lab, lb)
        return compress(torch.where(lab2 >= 0, lab2, lb2))
    return lab


@register("linear", flags={Flag.SHIFT_SOURCE})
def h_linear(a: Analysis, node: Node) -> Labels:
    """writer and reader: y = x W^T + b; W[:, k] reads input feature k, W[c] and b[c] write output feature c."""
    args = op_args(node)
    x, w, b = args["input"], args["weight"], args.get("bias")
    if w in a.weight_norms:
        return _weight_norm_layer(a, node, x, w, b, shape_of(node)[-1], ndim_of(node) - 1)
    return dense(a, node, x, w, b, read_dim=1, write_dim=0)


@register("addmm", flags={Flag.SHIFT_SOURCE})
def h_addmm(a: Analysis, node: Node) -> Labels:
    """writer and reader: addmm(b, x, W) = beta b + alpha x W with W (in, out) a parameter (GPT-2's Conv1D).

    W[k] reads input feature k; W[:, c] and b[c] write output feature c (beta and alpha are constants).
    A product of two activations, or W not a parameter, is a barrier.
    """
    args = op_args(node)
    x, w, b = args["mat1"], args["mat2"], args["input"]
    if a.param_name(w) is None or ndim_of(w) != 2 or ndim_of(b) > 1 or ndim_of(x) != 2:
        return a.barrier(node)
    return dense(a, node, x, w, b, read_dim=0, write_dim=1)


@register("mm")
def h_mm(a: Analysis, node: Node) -> Labels:
    """writer and reader: x @ W with W (in, out) a parameter: W[k] reads feature k, W[:, c] writes feature c."""
    args = op_args(node)
    x, w = args["input"], args["mat2"]
    if a.param_name(w) is None or w in a.env:
        return a.barrier(node)
    return dense(a, node, x, w, None, read_dim=0, write_dim=1)


Slice = tuple[int, tuple[int, ...], tuple[int, tuple[int, ...]] | None]
"""(dim, index, optional (sub dim, sub index)) of a weight: the block a channel reads or writes."""


def _conv(a: Analysis, node: Node, transposed: bool) -> Labels:
    """Convolutions: W[:, k] (or the depthwise rows of group k) reads input channel k; W[c], b[c] write c."""
    args = op_args(node)
    x, w, b = args["input"], args["weight"], args.get("bias")
    groups = int(args.get("groups", 1))
    if w in a.weight_norms and not transposed and groups == 1:
        cd = 1 if ndim_of(x) == ndim_of(w) else 0
        return _weight_norm_layer(a, node, x, w, b, shape_of(node)[cd], cd)
    wname, w_ok, bname, b_ok = weight_bias(a, w, b)
    computed = isinstance(b, Node) and bname is None  # a bias made in forward: out = x W + b, b an activation
    if computed:
        b, b_ok = None, True
    if wname is None or (b is not None and bname is None):
        return a.barrier(node)
    wshape = shape_of(w)
    nd_x = ndim_of(x)
    cdim = 1 if nd_x == len(wshape) else 0
    c_in = shape_of(x)[cdim]
    c_out = shape_of(node)[cdim]
    layer = module_of(wname)
    name = opname(node)

    ones = singletons(max(c_in, c_out))

    def reader_slice(k: int) -> Slice:
        """Input channel k = g * cpg_in + l of a grouped conv is read by the block weight[rows of g, l]."""
        if transposed:
            return 0, ones[k], None
        cpg_in, cpg_out = wshape[1], c_out // groups
        if groups == 1:
            return 1, ones[k], None
        g, l = divmod(k, cpg_in)
        rows = tuple(range(g * cpg_out, (g + 1) * cpg_out))
        return (0, rows, None) if cpg_in == 1 else (0, rows, (1, (l,)))

    def writer_slice(c: int) -> Slice:
        """Output channel c = g * cpg_out + l of a grouped transposed conv: the block weight[rows of g, l]."""
        if not transposed:
            return 0, ones[c], None
        cpg_in, cpg_out = c_in // groups, wshape[1]
        if groups == 1:
            return 1, ones[c], None
        g, l = divmod(c, cpg_out)
        rows = tuple(range(g * cpg_in, (g + 1) * cpg_in))
        return (0, rows, None) if cpg_out == 1 else (0, rows, (1, (l,)))

    lx = a.lab(x, nd_x)
    if live(lx):
        slots = per_index(a.uf, lx, cdim, c_in)
        if w_ok:
            for k, s in enumerate(slots):
                if s > 0:
                    d, idx, sub = reader_slice(k)
                    if sub is not None:
                        text = f"weight[{short_index(idx)}, {sub[1][0]}] of group {k // wshape[1]}"
                    else:
                        text = "weight[:, {idx}]" if d == 1 else "weight[{idx}]"
                    a.contributions.append(Contribution(s, wname, d, idx, "out",
                                                        f"{layer}: {name} reads channel {k} ({text})", sub))
        else:
            a.note_blocked(node, f"{name} (frozen weight)")
            taint(a.uf, lx)
    nd = ndim_of(node)
    if not (w_ok and b_ok):
        return invariant_label(nd)
    base, lab = a.fresh(c_out, nd, cdim)
    bias = bname if b is not None else None
    if not transposed:
        write_rows(a, base, c_out, wname, bias, f"{layer}: {name} writes channel {{idx}}", f"{layer}: bias[{{idx}}]")
        return lab
    for c in range(c_out):
        d, idx, sub = writer_slice(c)
        a.contributions.append(Contribution(base + c, wname, d, idx, "in", f"{layer}: {name} writes channel {c}", sub))
        if bias is not None:
            a.contributions.append(Contribution(base + c, bias, 0, (c,), "in", f"{layer}: bias[{{idx}}]"))
    return lab


@register("conv1d", "conv2d", "conv3d", "convolution", "_convolution", flags={Flag.SHIFT_SOURCE})
def h_conv(a: Analysis, node: Node) -> Labels:
    """writer and reader: W[:, k] (the block of group k if grouped) reads channel k; W[c], b[c] write channel c."""
    return _conv(a, node, transposed=bool(op_args(node).get("transposed", False)))


@register("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", flags={Flag.SHIFT_SOURCE})
def h_conv_transpose(a: Analysis, node: Node) -> Labels:
    """writer and reader: W[k] reads input channel k; W[:, c] (a block if grouped), b[c] write channel c."""
    return _conv(a, node, transposed=True)


@register("embedding")
def h_embedding(a: Analysis, node: Node) -> Labels:
    """writer: out[..., d] = W[idx, d], so column d of the table writes feature d."""
    w = op_args(node)["weight"]
    wname = a.param_name(w)
    nd = ndim_of(node)
    if wname is None:
        return a.barrier(node)
    if not a.usable(wname):
        return invariant_label(nd)
    dim = shape_of(w)[1]
    layer = module_of(wname)
    base, lab = a.fresh(dim, nd, nd - 1)
    for d in range(dim):
        a.contributions.append(
            Contribution(base + d, wname, 1, (d,), "in", f"{layer}: aten.embedding writes feature {{idx}}"))
    return lab


@dataclass(frozen=True)
class SourceParts:
    """A dense or convolution writer as the translation engines see it (`Flag.SHIFT_SOURCE`)."""

    x: Any
    weight: Any
    bias: Any
    in_dim: int
    """The weight's input-feature dim: its slice j, plus alpha everywhere, adds alpha x_j to every output channel."""
    class_dim: int
    """The output's channel axis."""


def shift_source(node: Node) -> SourceParts | None:
    """The parts of an ungrouped Linear / addmm / Conv / transposed Conv node (None for anything else).

    out[c] = b[c] + sum_j W(j, c) x_j (summed over kernel taps for a convolution): adding alpha to the whole
    slice of W that reads input j adds the same alpha * (x_j summed over taps) to every output channel c.
    """
    key = canonical(node)
    args = op_args(node)
    if key == "aten::linear":
        return SourceParts(args["input"], args["weight"], args.get("bias"), 1, ndim_of(node) - 1)
    if key == "aten::addmm":
        return SourceParts(args["mat1"], args["mat2"], args["input"], 0, ndim_of(node) - 1)
    if key is None or "conv" not in key or int(args.get("groups", 1)) != 1:
        return None
    x, w = args["input"], args["weight"]
    transposed = "transpose" in key or bool(args.get("transposed", False))
    return SourceParts(x, w, args.get("bias"), 0 if transposed else 1, 1 if ndim_of(x) == ndim_of(w) else 0)
