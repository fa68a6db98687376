"""Per-op rules: how each ATen op moves, ties, writes, reads or normalises channel slots.

Scaling a set K of slots by alpha > 0 (every activation entry labelled with a slot of K multiplied by
alpha, nothing else changed) leaves the loss unchanged when every op is consistent with it:

- pass-through ops are positively homogeneous of degree 1 per entry (relu, leaky_relu, dropout, max /
  avg pooling, interpolation, mul/div by something that does not move): the output entry keeps the
  input entry's slot;
- index maps (view, flatten, permute, cat, split, pad, ...) move entries: they are replayed on the
  label tensors (graph.py);
- add / sub / maximum of two activations and homogeneous reductions (sum, mean, pooling windows) mix
  entries: the slots they mix are united (one class, scaled together);
- writers make fresh output slots that scale with a parameter slice (conv/linear rows and bias, affine
  of BatchNorm/LayerNorm/GroupNorm, a parameter used directly as an activation, a layer-scale mul);
- readers are linear in an input channel through a parameter slice (conv/linear columns, depthwise
  rows, layer-scale entries), which absorbs the scale when divided by alpha;
- normalisers (train-mode BatchNorm per channel, LayerNorm/RMSNorm per row, GroupNorm per group)
  are invariant when whole normalisation groups scale together: their groups are united;
- anything else is a barrier: its input slots are joined to INVARIANT (tainted) and its output is
  INVARIANT (it does not move under any valid action, since every class feeding it is tainted).

Parameters that are frozen or used by more than one op never enter a group: a writer or reader
whose parameter cannot be scaled acts as a barrier for that role.

Contractions of two moving factors (attention scores q k^T) live in attention.py; the data every rule
reads and writes (`Analysis`, `Contribution`) and the small op helpers live in analysis.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import (
    Analysis,
    Contribution,
    Labels,
    Role,
    arg,
    base_op,
    dims_text,
    flat_args,
    invariant_outputs,
    module_of,
    ndim_of,
    opname,
    shape_of,
)
from neural_mechanics.symmetry.attention import h_matmul, h_sdpa, resolve_contractions
from neural_mechanics.symmetry.capture import CapturedGraph
from neural_mechanics.symmetry.graph import (
    INVARIANT,
    ZERO,
    collapse,
    compress,
    fit,
    invariant_label,
    live,
    per_index,
    slots_in,
    taint,
    union_pairs,
    zero_label,
)
from neural_mechanics.symmetry.groups import _short_index

PASS_THROUGH = {
    "relu", "leaky_relu", "dropout", "feature_dropout", "clone", "contiguous", "alias", "detach", "lift_fresh_copy",
    "neg", "abs", "positive", "_to_copy", "to", "type_as", "prelu", "_prelu_kernel", "identity",
}
INDEX_MAPS = {
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "expand", "expand_as", "view_as", "reshape_as", "slice", "select", "narrow", "split", "split_with_sizes", "chunk",
    "unbind", "tensor_split", "cat", "concat", "concatenate", "stack", "repeat", "flip", "roll", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "movedim", "moveaxis", "swapaxes", "swapdims",
    "pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "unfold", "im2col", "hstack", "vstack",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "linalg_vector_norm", "nansum"}
POOLS = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
    "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa",
}
ZERO_FACTORIES = {"zeros", "zeros_like", "new_zeros"}
CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d"}


# ---- handlers --------------------------------------------------------------------------------
def h_pass_through(a: Analysis, node: Node) -> Labels:
    return fit(a.lab(node.args[0]), ndim_of(node))


CONCATS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
SINGLE_SOURCE_MAPS = INDEX_MAPS - {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "pad",
                                   "constant_pad_nd", "im2col"}
"""Index maps whose output entries are all entries of their one tensor input (no padding, no other inputs)."""
DIM_ONLY = {"permute", "transpose", "t", "unsqueeze", "movedim", "moveaxis", "swapaxes", "swapdims"}
RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as"}


def _reshape_labels(lab: Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Tensor:
    """Row-major reshape of compressed labels, expanding only the part that the reshape rearranges.

    With a prefix of k input dims and m output dims of equal product along which the labels are constant,
    out[p, r'] = in[p, r] with the same map r -> r' for every prefix p: only the rest is replayed.
    """
    k = m = 0
    pin = pout = 1
    best = (0, 0)
    while k <= len(in_shape) and m <= len(out_shape):
        if pin == pout and all(lab.shape[d] == 1 for d in range(k)):
            best = (k, m)
        if pin <= pout and k < len(in_shape):
            if lab.shape[k] != 1:
                break
            pin *= in_shape[k]
            k += 1
        elif m < len(out_shape):
            pout *= out_shape[m]
            m += 1
        else:
            break
    k, m = best
    rest = lab[(0,) * k] if k else lab
    rest = rest.expand(in_shape[k:]).reshape(out_shape[m:])
    return compress(rest.reshape((1,) * m + tuple(out_shape[m:])))


def _fast_index_map(a: Analysis, node: Node) -> Labels | None:
    """Index maps applied to the compressed labels directly (None: replay on the expanded labels)."""
    op = base_op(node)
    x = node.args[0] if node.args else None
    if not isinstance(x, Node) or op not in SINGLE_SOURCE_MAPS or not isinstance(x.meta.get("val"), Tensor):
        return None
    in_shape = shape_of(x)
    out = node.meta.get("val")
    if not in_shape or any(s == 0 for s in in_shape):
        return None
    lab = a.lab(x, len(in_shape))
    if lab.numel() == 1:  # one label everywhere: any rearrangement keeps it
        if isinstance(out, Tensor):
            return lab.reshape((1,) * out.ndim)
        if isinstance(out, (list, tuple)) and all(isinstance(o, Tensor) for o in out):
            return [lab.reshape((1,) * o.ndim) for o in out]
        return None
    if not isinstance(out, Tensor) or any(s == 0 for s in out.shape):
        return None
    if op in DIM_ONLY:
        return node.target(lab, *node.args[1:], **node.kwargs)  # type: ignore[operator]
    if op in RESHAPES:
        return _reshape_labels(lab, in_shape, tuple(int(s) for s in out.shape))
    if op == "expand":
        return fit(lab, out.ndim)
    if op == "select":
        dim, i = int(node.args[1]) % len(in_shape), int(node.args[2])  # type: ignore[arg-type]
        return compress(lab.select(dim, 0 if lab.shape[dim] == 1 else i))
    if op == "squeeze":
        dims = arg(node, 1, "dim", None)
        dims = range(len(in_shape)) if dims is None else [dims] if isinstance(dims, int) else dims
        drop = sorted({d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1}, reverse=True)
        for d in drop:
            lab = lab.squeeze(d)
        return lab
    return None


def h_index_map(a: Analysis, node: Node) -> Labels:
    """Replay the op on float64 label tensors expanded to the real shapes (exact for ids < 2**53)."""
    fast = _fast_index_map(a, node)
    if fast is not None:
        return fast
    op = base_op(node)
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if op in ("pad", "constant_pad_nd"):
        mode = arg(node, 2, "mode", "constant") if op == "pad" else "constant"
        value = arg(node, 3 if op == "pad" else 2, "value", None)
        if mode == "constant":
            if value not in (None, 0, 0.0):
                taint(a.uf, a.lab(node.args[0]))
                return invariant_outputs(node)
            if op == "pad":
                args = [*args[:2], "constant", float(ZERO)]
                kwargs.pop("mode", None)
                kwargs.pop("value", None)
            else:
                args = [*args[:2], float(ZERO)]
                kwargs.pop("value", None)

    def sub(x: Any) -> Any:
        if isinstance(x, Node):
            shape = shape_of(x)
            if x.meta.get("val") is None or not isinstance(x.meta.get("val"), Tensor):
                return x.meta.get("val")
            return a.lab(x, len(shape)).to(torch.float64).expand(shape).contiguous()
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        return x

    try:
        out = node.target(*[sub(x) for x in args], **{k: sub(v) for k, v in kwargs.items()})  # type: ignore[operator]
    except Exception:
        return a.barrier(node)
    labels = _to_labels(out)
    if op in CONCATS and isinstance(labels, Tensor):
        dim = arg(node, 1, "dim", 0)
        text = f"{opname(node)} ({node.name}) concatenates {len(node.args[0])} inputs along dim {dim}"  # type: ignore[arg-type]
        for slot in slots_in(labels):
            a.couplings.append((slot, text))
    return labels


def _to_labels(out: Any) -> Labels:
    if isinstance(out, Tensor):
        return compress(out.to(torch.long))
    if isinstance(out, (list, tuple)):
        return [_to_labels(o) for o in out]
    return None


def h_getitem(a: Analysis, node: Node) -> Labels:
    src = a.env.get(node.args[0])  # type: ignore[arg-type]
    i = node.args[1]
    if isinstance(src, list) and isinstance(i, int):
        return src[i]
    return invariant_outputs(node)


def h_reduce(a: Analysis, node: Node) -> Labels:
    """Homogeneous reductions over `dim`: unite what is reduced; drop the dims unless keepdim."""
    x = node.args[0]
    nd = ndim_of(x)
    op = base_op(node)
    dim_i, keep_i = (2, 3) if op == "linalg_vector_norm" else (1, 2)
    dims = arg(node, dim_i, "dim", None)
    keep = bool(arg(node, keep_i, "keepdim", False))
    if isinstance(dims, int):
        dims = [dims]
    if dims is None or len(dims) == 0:
        dims = list(range(nd))
    dims = [d % nd for d in dims] if nd else []
    lab = collapse(a.uf, a.lab(x, nd), dims)
    if not keep:
        for d in sorted(dims, reverse=True):
            lab = lab.squeeze(d) if lab.ndim > d else lab
    return fit(lab, ndim_of(node))


def h_pool(a: Analysis, node: Node) -> Labels:
    """Pooling / interpolation: positively homogeneous, mixing only the trailing k spatial dims."""
    op = base_op(node)
    k = int(next(ch for ch in reversed(op) if ch.isdigit()))
    x = node.args[0]
    nd = ndim_of(x)
    lab = collapse(a.uf, a.lab(x, nd), list(range(nd - k, nd)))
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return [lab, invariant_label(nd)]
    return lab


def h_add(a: Analysis, node: Node) -> Labels:
    """x + y, x - y, max(x, y): unite the slots met at each position; a non-zero constant taints."""
    nd = ndim_of(node)
    x, y = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not isinstance(x, Node):
        x, y = y, x
    if not isinstance(y, Node):
        lab = a.lab(x, nd)
        if y not in (0, 0.0, False):
            if live(lab):
                a.blocked[f"{opname(node)} (non-zero constant)"] += 1
            taint(a.uf, lab)
        return lab
    lx, ly = a.lab(x, nd), a.lab(y, nd)
    text = f"{opname(node)} ({node.name}) sums two branches channel by channel"
    for s, _t in union_pairs(a.uf, lx, ly):
        a.couplings.append((s, text))
    lx2, ly2 = torch.broadcast_tensors(lx, ly)
    return compress(torch.where(lx2 >= 0, lx2, ly2))


def h_clamp(a: Analysis, node: Node) -> Labels:
    """clamp(x, min=0) is relu; any other bound breaks homogeneity."""
    lo = arg(node, 1, "min", None)
    hi = arg(node, 2, "max", None)
    if lo in (0, 0.0) and hi is None:
        return h_pass_through(a, node)
    return a.barrier(node)


def h_mul(a: Analysis, node: Node) -> Labels:
    """x * c, x / c for c that does not move: pass-through; x * p (layer scale): reader and writer."""
    nd = ndim_of(node)
    op = base_op(node)
    x, y = node.args[0], node.args[1]
    if not isinstance(y, Node):
        return a.lab(x, nd)
    if not isinstance(x, Node):  # scalar * tensor is not produced by ATen, but be safe
        return a.lab(y, nd) if op == "mul" else a.barrier(node)
    if op == "mul":
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
    lx, ly = a.lab(x, nd), a.lab(y, nd)
    if not live(ly):
        return compress(torch.broadcast_tensors(lx, ly)[0])
    if op == "mul" and not live(lx):
        return compress(torch.broadcast_tensors(ly, lx)[0])
    return a.barrier(node)


CHAIN_OPS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "permute", "transpose", "flatten",
             "unflatten", "contiguous", "clone", "alias", "view_as", "reshape_as", "movedim"}
"""Single-input rearrangements a parameter may pass through on its way to a layer-scale product."""


def find_scale_chains(graph: torch.fx.Graph, params: dict[Node, str], live_nodes: set[Node]) -> dict[Node, Any]:
    """Parameters reshaped before a product (`gamma.view(-1, 1, 1) * x`): chain end -> (param, chain nodes).

    The parameter and every node of the chain must have exactly one live use, and the chain must end in a
    `mul`: then the product is a layer scale of the parameter's elements (see `_layer_scale`).
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
            if base_op(u) in CHAIN_OPS and u.args and u.args[0] is cur:
                chain.append(u)
                cur = u
                continue
            if base_op(u) == "mul" and chain:
                out[chain[-1]] = (pnode, chain)
            break
    return out


def _replay_chain(pnode: Node, chain: list[Node]) -> Tensor:
    """Element numbers of the parameter (row-major) carried through the chain's rearrangements."""
    shape = shape_of(pnode)
    t = torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float64).view(shape)
    for c in chain:
        t = c.target(t, *c.args[1:], **c.kwargs)  # type: ignore[operator]
    return compress(t.to(torch.long))


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


def _weight_bias(a: Analysis, node: Node, w: Any, b: Any) -> tuple[str | None, bool, str | None, bool]:
    wname, bname = a.param_name(w), a.param_name(b)
    w_ok = a.usable(wname)
    b_ok = b is None or a.usable(bname)
    return wname, w_ok, bname, b_ok


def h_weight_norm(a: Analysis, node: Node) -> Labels:
    """w = g v / |v| (norm over every dim but `dim`): each slice v[c] is normalised, so it is scale-invariant.

    The weight itself is recorded for the Linear/Conv that uses it (`_weight_norm_layer`): g[c] writes
    output channel c there.
    """
    v, g = node.args[0], node.args[1]
    dim = int(arg(node, 2, "dim", 0))
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
        a.blocked[f"{opname(node)} (reads through weight norm)"] += 1
        taint(a.uf, lx)
    nd = ndim_of(node)
    if not a.usable(gname) or (b is not None and not a.usable(bname)):
        return invariant_label(nd)
    base, lab = a.fresh(n_out, nd, cdim)
    layer = module_of(gname)
    _write_rows(a, base, n_out, gname, bname if b is not None else None,
                f"{layer}: {opname(node)} writes channel {{idx}} (weight norm magnitude {gname}[{{idx}}])",
                f"{layer}: bias[{{idx}}]")
    return lab


def h_linear(a: Analysis, node: Node) -> Labels:
    """y = x W^T + b: W[:, k] reads input feature k; W[c], b[c] write output feature c."""
    x, w = node.args[0], node.args[1]
    b = arg(node, 2, "bias", None)
    if w in a.weight_norms:
        return _weight_norm_layer(a, node, x, w, b, shape_of(node)[-1], ndim_of(node) - 1)  # type: ignore[arg-type]
    wname, w_ok, bname, b_ok = _weight_bias(a, node, w, b)
    if wname is None or (b is not None and bname is None):
        return a.barrier(node)
    c_out, c_in = shape_of(w)
    layer = module_of(wname)
    lx = a.lab(x, ndim_of(x))
    if live(lx):
        if w_ok:
            event = f"{layer}: aten.linear reads feature {{idx}} (weight[:, {{idx}}])"
            add = a.contributions.append
            for k, s in enumerate(per_index(a.uf, lx, -1, c_in)):
                if s > 0:
                    add(Contribution(s, wname, 1, (k,), "out", event))
        else:
            a.blocked[f"{opname(node)} (frozen or shared weight)"] += 1
            taint(a.uf, lx)
    nd = ndim_of(node)
    if not (w_ok and b_ok):
        return invariant_label(nd)
    base, lab = a.fresh(c_out, nd, nd - 1)
    _write_rows(a, base, c_out, wname, bname if b is not None else None, f"{layer}: aten.linear writes feature {{idx}}",
                f"{layer}: bias[{{idx}}]")
    return lab


def _write_rows(a: Analysis, base: int, n: int, wname: str, bname: str | None, wevent: str, bevent: str) -> None:
    """Slot base + c is written by wname[c] (and bname[c]) for c < n (dim 0 of both)."""
    add = a.contributions.append
    for c in range(n):
        idx = (c,)
        add(Contribution(base + c, wname, 0, idx, "in", wevent))
        if bname is not None:
            add(Contribution(base + c, bname, 0, idx, "in", bevent))


def h_conv(a: Analysis, node: Node) -> Labels:
    """Convolutions: W[:, k] (or the depthwise rows of group k) reads input channel k; W[c], b[c] write c."""
    op = base_op(node)
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias", None)
    if op in ("convolution", "_convolution"):
        transposed = bool(node.args[6])
        groups = int(node.args[8])  # type: ignore[arg-type]
    elif op.startswith("conv_transpose"):
        transposed = True
        groups = int(arg(node, 6, "groups", 1))
    else:
        transposed = False
        groups = int(arg(node, 6, "groups", 1))
    if w in a.weight_norms and not transposed and groups == 1:
        cd = 1 if ndim_of(x) == ndim_of(w) else 0
        return _weight_norm_layer(a, node, x, w, b, shape_of(node)[cd], cd)  # type: ignore[arg-type]
    wname, w_ok, bname, b_ok = _weight_bias(a, node, w, b)
    if wname is None or (b is not None and bname is None):
        return a.barrier(node)
    wshape = shape_of(w)
    nd_x = ndim_of(x)
    cdim = 1 if nd_x == len(wshape) else 0
    c_in = shape_of(x)[cdim]
    c_out = shape_of(node)[cdim]
    layer = module_of(wname)
    name = opname(node)

    Slice = tuple[int, tuple[int, ...], tuple[int, tuple[int, ...]] | None]

    def reader_slice(k: int) -> Slice:
        """Input channel k = g * cpg_in + l of a grouped conv is read by the block weight[rows of g, l]."""
        if transposed:
            return 0, (k,), None
        cpg_in, cpg_out = wshape[1], c_out // groups
        if groups == 1:
            return 1, (k,), None
        g, l = divmod(k, cpg_in)
        rows = tuple(range(g * cpg_out, (g + 1) * cpg_out))
        return (0, rows, None) if cpg_in == 1 else (0, rows, (1, (l,)))

    def writer_slice(c: int) -> Slice:
        """Output channel c = g * cpg_out + l of a grouped transposed conv: the block weight[rows of g, l]."""
        if not transposed:
            return 0, (c,), None
        cpg_in, cpg_out = c_in // groups, wshape[1]
        if groups == 1:
            return 1, (c,), None
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
                        text = f"weight[{_short_index(idx)}, {sub[1][0]}] of group {k // wshape[1]}"
                    else:
                        text = "weight[:, {idx}]" if d == 1 else "weight[{idx}]"
                    a.contributions.append(Contribution(s, wname, d, idx, "out",
                                                        f"{layer}: {name} reads channel {k} ({text})", sub))
        else:
            a.blocked[f"{name} (frozen or shared weight)"] += 1
            taint(a.uf, lx)
    nd = ndim_of(node)
    if not (w_ok and b_ok):
        return invariant_label(nd)
    base, lab = a.fresh(c_out, nd, cdim)
    bias = bname if b is not None else None
    if not transposed:
        _write_rows(a, base, c_out, wname, bias, f"{layer}: {name} writes channel {{idx}}", f"{layer}: bias[{{idx}}]")
        return lab
    for c in range(c_out):
        d, idx, sub = writer_slice(c)
        a.contributions.append(Contribution(base + c, wname, d, idx, "in", f"{layer}: {name} writes channel {c}", sub))
        if bias is not None:
            a.contributions.append(Contribution(base + c, bias, 0, (c,), "in", f"{layer}: bias[{{idx}}]"))
    return lab


def _affine_writer(a: Analysis, node: Node, w: Any, b: Any, n: int, nd: int, dim: int, what: str) -> Labels:
    """out_c = w_c * xhat_c + b_c with xhat invariant: w[c], b[c] write a fresh slot c."""
    if w is None:
        return invariant_label(nd)
    wname, w_ok, bname, b_ok = _weight_bias(a, node, w, b)
    if wname is None or not (w_ok and b_ok) or (b is not None and bname is None):
        return invariant_label(nd)
    layer = module_of(wname)
    base, lab = a.fresh(n, nd, dim)
    _write_rows(a, base, n, wname, bname if b is not None else None,
                f"{layer}: {opname(node)} affine writes {what} {{idx}} (weight[{{idx}}])", f"{layer}: bias[{{idx}}]")
    return lab


def _layer_of(a: Analysis, node: Node, w: Any) -> str:
    name = a.param_name(w)
    return module_of(name) if name else node.name


def _normalise_channels(a: Analysis, lx: Tensor, c: int, event: Callable[[int], str]) -> None:
    """Each of the `c` channels (dim 1) of `lx` is normalised on its own: its live slot absorbs scale, `event(ch)`."""
    for ch, s in enumerate(per_index(a.uf, lx, 1, c)):
        if s > 0:
            a.normalised.setdefault(s, []).append(event(ch))


def h_batch_norm(a: Analysis, node: Node) -> Labels:
    """Train mode: channel c is normalised over (N, spatial) -> scale-invariant. Eval mode: affine, a barrier."""
    x, w, b = node.args[0], node.args[1], node.args[2]
    op = base_op(node)
    training = bool(node.args[5])
    nd = ndim_of(x)
    c = shape_of(x)[1]
    layer = _layer_of(a, node, w)
    lx = a.lab(x, nd)
    if training:
        kind = "train" if op == "batch_norm" else "batch statistics"
        what = f"{layer}: {opname(node)} ({kind})"
        over = dims_text(nd, 1)
        _normalise_channels(a, lx, c, lambda ch: f"{what} normalises channel {ch} over {over}")
    else:
        if op == "batch_norm":
            a.eval_batchnorm.append(layer)
        if live(lx):
            a.blocked[f"{opname(node)} (eval mode: running statistics)"] += 1
        taint(a.uf, lx)
    return _affine_writer(a, node, w, b, c, ndim_of(node), 1, "channel")


def h_layer_norm(a: Analysis, node: Node) -> Labels:
    """LayerNorm / RMSNorm over the trailing dims: every row is normalised jointly (its slots united)."""
    op = base_op(node)
    x = node.args[0]
    shape = list(node.args[1])  # type: ignore[arg-type]
    w = arg(node, 2, "weight", None)
    b = arg(node, 3, "bias", None) if op == "layer_norm" else None
    nd = ndim_of(x)
    k = len(shape)
    layer = _layer_of(a, node, w)
    lab = collapse(a.uf, a.lab(x, nd), list(range(nd - k, nd)))
    for s in slots_in(lab):
        a.normalised.setdefault(s, []).append(
            f"{layer}: {opname(node)} normalises the last {k} dim(s) {tuple(shape)} jointly")
    if k == 1:
        return _affine_writer(a, node, w, b, shape[0], ndim_of(node), nd - 1, "feature")
    if w is None:
        return invariant_label(nd)
    wname, w_ok, bname, b_ok = _weight_bias(a, node, w, b)
    if wname is None or not (w_ok and b_ok):
        return invariant_label(nd)
    slot = a.uf.new(1)
    a.contributions.append(Contribution(slot, wname, None, None, "in", f"{layer}: {opname(node)} affine (weight)"))
    if b is not None and bname is not None:
        a.contributions.append(Contribution(slot, bname, None, None, "in", f"{layer}: bias"))
    return torch.full((1,) * nd, slot, dtype=torch.long)


def h_group_norm(a: Analysis, node: Node) -> Labels:
    """GroupNorm: the channels of one group (and their spatial extent) are normalised jointly."""
    x, groups = node.args[0], int(node.args[1])  # type: ignore[arg-type]
    w, b = arg(node, 2, "weight", None), arg(node, 3, "bias", None)
    nd = ndim_of(x)
    c = shape_of(x)[1]
    layer = _layer_of(a, node, w)
    chans = per_index(a.uf, a.lab(x, nd), 1, c)
    per = c // groups
    for g in range(groups):
        rep = a.uf.union_all(chans[g * per : (g + 1) * per])
        if rep is not None and rep > 0:
            a.normalised.setdefault(rep, []).append(
                f"{layer}: {opname(node)} normalises channels {g * per}:{(g + 1) * per} (group {g}) jointly")
    return _affine_writer(a, node, w, b, c, ndim_of(node), 1, "channel")


def h_instance_norm(a: Analysis, node: Node) -> Labels:
    x, w, b = node.args[0], node.args[1], node.args[2]
    use_stats = bool(node.args[5])
    nd = ndim_of(x)
    c = shape_of(x)[1]
    layer = _layer_of(a, node, w)
    lx = a.lab(x, nd)
    if use_stats:
        _normalise_channels(a, lx, c, lambda ch: f"{layer}: {opname(node)} normalises channel {ch} per sample")
    else:
        taint(a.uf, lx)
    return _affine_writer(a, node, w, b, c, ndim_of(node), 1, "channel")


def h_embedding(a: Analysis, node: Node) -> Labels:
    """out[..., d] = W[idx, d]: column d of the table writes feature d."""
    w = node.args[0]
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


def h_zero_factory(a: Analysis, node: Node) -> Labels:
    return zero_label(ndim_of(node))


HANDLERS: dict[str, Callable[[Analysis, Node], Labels]] = {}
for _n in PASS_THROUGH:
    HANDLERS[_n] = h_pass_through
for _n in INDEX_MAPS:
    HANDLERS[_n] = h_index_map
for _n in REDUCTIONS:
    HANDLERS[_n] = h_reduce
for _n in POOLS:
    HANDLERS[_n] = h_pool
for _n in CONVS:
    HANDLERS[_n] = h_conv
for _n in ZERO_FACTORIES:
    HANDLERS[_n] = h_zero_factory
HANDLERS.update({
    "getitem": h_getitem,
    "add": h_add, "sub": h_add, "maximum": h_add, "minimum": h_add,
    "mul": h_mul, "div": h_mul, "true_divide": h_mul,
    "clamp": h_clamp, "clamp_min": h_clamp,
    "linear": h_linear,
    "batch_norm": h_batch_norm,
    "layer_norm": h_layer_norm, "rms_norm": h_layer_norm,
    "group_norm": h_group_norm,
    "instance_norm": h_instance_norm,
    "embedding": h_embedding,
    "_weight_norm": h_weight_norm,
    "matmul": h_matmul, "bmm": h_matmul,
    "scaled_dot_product_attention": h_sdpa,
})


LEAKS = {"item", "_local_scalar_dense", "resolve_neg", "resolve_conj", "is_nonzero", "equal", "tolist"}
"""Ops through which a value leaves the graph into Python (`.item()`, `if t:`, `.numpy()`): the branch or
constant that Python derives from it may change under a group action, so they count as outputs."""


def _reaching_output(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose value flows into the output or leaks into Python (in-place ops are kept regardless).

    Everything else (a computed but unused branch) constrains nothing and is skipped.
    """
    seen: set[Node] = set()
    stack = [n for n in graph.nodes if n.op == "output" or (n.op == "call_function" and base_op(n) in LEAKS)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def run_rules(cap: CapturedGraph) -> Analysis:
    """Label every node of the captured graph, uniting and tainting slots as the ops demand."""
    a = Analysis(cap)
    for name, trainable in cap.trainable.items():
        if not trainable:
            a.unusable[name] = "frozen (requires_grad=False)"
    live_nodes = _reaching_output(cap.graph)
    for node, name in cap.params.items():
        uses = sum(1 for u in node.users if u in live_nodes for x in flat_args(u) if x is node)
        if uses > 1 and name not in a.unusable:
            a.unusable[name] = f"shared: used by {uses} operations"
    a.scale_chains = find_scale_chains(cap.graph, cap.params, live_nodes)
    in_chain = {c for _, chain in a.scale_chains.values() for c in chain}
    for node in cap.graph.nodes:
        if node in in_chain:  # a reshaped layer-scale parameter: handled by the product (h_mul)
            a.env[node] = invariant_outputs(node)
            continue
        if node.op == "call_function" and node not in live_nodes and not opname(node).endswith("_"):
            a.dead.append(node)  # its value never reaches the loss nor Python: it constrains nothing
            a.env[node] = invariant_outputs(node)
            continue
        if node.op == "placeholder":
            if node not in cap.params:
                a.env[node] = invariant_outputs(node)
            continue
        if node.op == "output":
            for x in flat_args(node):
                if isinstance(x, Node):
                    taint(a.uf, a.lab(x))
            continue
        if node.op != "call_function":
            a.env[node] = a.barrier(node)
            continue
        op = base_op(node)
        handler = HANDLERS.get(op)
        if handler is None:
            a.env[node] = a.barrier(node)
        else:
            a.env[node] = handler(a, node)
    resolve_contractions(a)
    return a


__all__ = ["HANDLERS", "INVARIANT", "LEAKS", "Analysis", "Contribution", "Role", "arg", "base_op", "module_of",
           "ndim_of", "opname", "run_rules", "shape_of"]
