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
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.capture import CapturedGraph
from neural_mechanics.symmetry.graph import (
    INVARIANT,
    ZERO,
    UnionFind,
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

Role = Literal["in", "out"]
Labels = Any  # Tensor | list[Tensor] | None


@dataclass
class Contribution:
    """Parameter slice `param[index along dim]` writes (role "in") or reads (role "out") `slot`."""

    slot: int
    param: str
    dim: int | None
    index: tuple[int, ...] | None
    role: Role
    event: str
    """Template for `Symmetry.chain`; "{idx}" is replaced by the merged indices."""


@dataclass
class Analysis:
    """The result of running the rules over a captured graph."""

    cap: CapturedGraph
    uf: UnionFind = field(default_factory=UnionFind)
    contributions: list[Contribution] = field(default_factory=list)
    normalised: dict[int, list[str]] = field(default_factory=dict)
    """slot -> events of normalisers that absorb its scale."""
    couplings: list[tuple[int, str]] = field(default_factory=list)
    blocked: Counter = field(default_factory=Counter)
    eval_batchnorm: list[str] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)
    """parameter name -> why it cannot be in a group (frozen, shared)."""
    env: dict[Node, Labels] = field(default_factory=dict)
    dead: list[Node] = field(default_factory=list)
    """Ops whose value never reaches the output nor Python (an unused branch)."""

    # ---- parameters --------------------------------------------------------------------------
    def param_name(self, arg: Any) -> str | None:
        return self.cap.params.get(arg) if isinstance(arg, Node) else None

    def usable(self, name: str | None) -> bool:
        return name is not None and name not in self.unusable

    # ---- labels ------------------------------------------------------------------------------
    def lab(self, arg: Any, ndim: int | None = None) -> Tensor:
        """Labels of an argument (scalars and non-tensors are INVARIANT), fitted to rank `ndim`."""
        if isinstance(arg, Node):
            if arg not in self.env and arg in self.cap.params:
                self.env[arg] = self.param_as_activation(arg)
            v = self.env.get(arg)
            if isinstance(v, Tensor):
                return v if ndim is None else fit(v, ndim)
        return invariant_label(0 if ndim is None else ndim)

    def param_as_activation(self, node: Node) -> Tensor:
        """A parameter entering an op as data (positional embedding, class token, x + bias): a writer.

        Slots run along its last dimension of size > 1 (all other dimensions share them, a coarser but
        sound choice); member `param[i along that dim]` scales slot i.
        """
        name = self.cap.params[node]
        shape = tuple(shape_of(node))
        if not self.usable(name):
            return invariant_label(len(shape))
        dims = [d for d, s in enumerate(shape) if s > 1]
        if not dims:
            slot = self.uf.new(1)
            self.contributions.append(
                Contribution(slot, name, None, None, "in", f"{name}: used directly as an activation")
            )
            return torch.full((1,) * len(shape), slot, dtype=torch.long)
        d = dims[-1]
        base = self.uf.new(shape[d])
        for i in range(shape[d]):
            self.contributions.append(
                Contribution(base + i, name, d, (i,), "in", f"{name}: used directly as an activation, index {{idx}}")
            )
        view = [1] * len(shape)
        view[d] = shape[d]
        return (base + torch.arange(shape[d])).view(view)

    def fresh(self, n: int, ndim: int, dim: int) -> tuple[int, Tensor]:
        """Allocate n fresh slots laid out along `dim` of a rank-`ndim` activation."""
        base = self.uf.new(n)
        view = [1] * ndim
        view[dim] = n
        return base, (base + torch.arange(n)).view(view)

    def barrier(self, node: Node) -> Labels:
        """Taint every slot reaching `node`; its output does not move."""
        found = False
        for arg in _flat_args(node):
            if isinstance(arg, Node):
                lab = self.lab(arg)
                if live(lab):
                    found = True
                    taint(self.uf, lab)
        if found:
            self.blocked[opname(node)] += 1
        return invariant_outputs(node)


# ---- helpers ---------------------------------------------------------------------------------
def opname(node: Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    packet = getattr(t, "overloadpacket", None)
    return str(packet) if packet is not None else getattr(t, "__name__", str(t))


def base_op(node: Node) -> str:
    """`aten.relu_` -> `relu`: the op name without namespace and in-place suffix."""
    name = opname(node).rpartition(".")[2]
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def shape_of(node: Any) -> tuple[int, ...]:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, Tensor) else ()


def ndim_of(node: Any) -> int:
    return len(shape_of(node))


def invariant_outputs(node: Node) -> Labels:
    v = node.meta.get("val")
    if isinstance(v, Tensor):
        return invariant_label(v.ndim)
    if isinstance(v, (list, tuple)):
        return [invariant_label(x.ndim) if isinstance(x, Tensor) else None for x in v]
    return None


def _flat_args(node: Node) -> list[Any]:
    out: list[Any] = []

    def visit(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
        else:
            out.append(a)

    visit(node.args)
    visit(node.kwargs)
    return out


def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def module_of(param: str) -> str:
    return param.rpartition(".")[0] or param


def _dims_text(ndim: int, skip: int) -> str:
    names = {1: ["N"], 2: ["N"], 3: ["N", "L"], 4: ["N", "H", "W"], 5: ["N", "D", "H", "W"]}.get(ndim)
    if names is None:
        names = [f"d{i}" for i in range(ndim) if i != skip]
    return "(" + ",".join(names) + ")"


# ---- op tables -------------------------------------------------------------------------------
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


def h_index_map(a: Analysis, node: Node) -> Labels:
    """Replay the op on float64 label tensors expanded to the real shapes (exact for ids < 2**53)."""
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
    return _to_labels(out)


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
    for s, _t in union_pairs(a.uf, lx, ly):
        a.couplings.append((s, f"{opname(node)} ({node.name}) sums two branches channel by channel"))
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


def _layer_scale(a: Analysis, node: Node, p: Node, name: str, x: Node) -> Labels:
    """out = p * x: p[i] reads every slot it multiplies (united) and writes a fresh slot i."""
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
        view = [1] * len(pshape)
        view[d] = n
        idx = fit(torch.arange(n).view(view), nd)
    lx = a.lab(x, nd)
    lx2, idx2 = torch.broadcast_tensors(lx, idx)
    base = a.uf.new(n)
    for i in range(n):
        rep = a.uf.union_all(set(lx2[idx2 == i].tolist()))
        member = (d, None if d is None else (i,))
        if rep is not None and rep > 0:
            a.contributions.append(Contribution(rep, name, member[0], member[1], "out",
                                                f"{layer}: {opname(node)} by {name} reads {{idx}}"))
        a.contributions.append(Contribution(base + i, name, member[0], member[1], "in",
                                            f"{layer}: {opname(node)} by {name} writes {{idx}}"))
    a.env[p] = invariant_label(len(pshape))
    return base + idx


def _weight_bias(a: Analysis, node: Node, w: Any, b: Any) -> tuple[str | None, bool, str | None, bool]:
    wname, bname = a.param_name(w), a.param_name(b)
    w_ok = a.usable(wname)
    b_ok = b is None or a.usable(bname)
    return wname, w_ok, bname, b_ok


def h_linear(a: Analysis, node: Node) -> Labels:
    """y = x W^T + b: W[:, k] reads input feature k; W[c], b[c] write output feature c."""
    x, w = node.args[0], node.args[1]
    b = arg(node, 2, "bias", None)
    wname, w_ok, bname, b_ok = _weight_bias(a, node, w, b)
    if wname is None or (b is not None and bname is None):
        return a.barrier(node)
    c_out, c_in = shape_of(w)
    layer = module_of(wname)
    lx = a.lab(x, ndim_of(x))
    if live(lx):
        if w_ok:
            for k, s in enumerate(per_index(a.uf, lx, -1, c_in)):
                if s > 0:
                    a.contributions.append(Contribution(
                        s, wname, 1, (k,), "out", f"{layer}: aten.linear reads feature {{idx}} (weight[:, {{idx}}])"))
        else:
            a.blocked[f"{opname(node)} (frozen or shared weight)"] += 1
            taint(a.uf, lx)
    nd = ndim_of(node)
    if not (w_ok and b_ok):
        return invariant_label(nd)
    base, lab = a.fresh(c_out, nd, nd - 1)
    for c in range(c_out):
        a.contributions.append(
            Contribution(base + c, wname, 0, (c,), "in", f"{layer}: aten.linear writes feature {{idx}}"))
        if b is not None and bname is not None:
            a.contributions.append(Contribution(base + c, bname, 0, (c,), "in", f"{layer}: bias[{{idx}}]"))
    return lab


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

    def reader_slice(k: int) -> tuple[int, tuple[int, ...]] | None:
        if transposed:
            return 0, (k,)
        cpg_in, cpg_out = wshape[1], c_out // groups
        if groups == 1:
            return 1, (k,)
        if cpg_in == 1:
            return 0, tuple(range(k * cpg_out, (k + 1) * cpg_out))
        return None

    def writer_slice(c: int) -> tuple[int, tuple[int, ...]] | None:
        if not transposed:
            return 0, (c,)
        cpg_in = c_in // groups
        if groups == 1:
            return 1, (c,)
        if wshape[1] == 1:
            return 0, tuple(range(c * cpg_in, (c + 1) * cpg_in))
        return None

    lx = a.lab(x, nd_x)
    if live(lx):
        slots = per_index(a.uf, lx, cdim, c_in)
        ok = w_ok and all(reader_slice(k) is not None for k in range(c_in))
        if ok:
            for k, s in enumerate(slots):
                if s > 0:
                    d, idx = reader_slice(k)  # type: ignore[misc]
                    text = "weight[:, {idx}]" if d == 1 else "weight[{idx}]"
                    a.contributions.append(Contribution(s, wname, d, idx, "out",
                                                        f"{layer}: {name} reads channel {k} ({text})"))
        else:
            a.blocked[f"{name} ({'frozen or shared weight' if not w_ok else 'grouped'})"] += 1
            taint(a.uf, lx)
    nd = ndim_of(node)
    if not (w_ok and b_ok) or any(writer_slice(c) is None for c in range(c_out)):
        return invariant_label(nd)
    base, lab = a.fresh(c_out, nd, cdim)
    for c in range(c_out):
        d, idx = writer_slice(c)  # type: ignore[misc]
        a.contributions.append(Contribution(base + c, wname, d, idx, "in", f"{layer}: {name} writes channel {c}"))
        if b is not None and bname is not None:
            a.contributions.append(Contribution(base + c, bname, 0, (c,), "in", f"{layer}: bias[{{idx}}]"))
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
    for c in range(n):
        a.contributions.append(Contribution(base + c, wname, 0, (c,), "in",
                                            f"{layer}: {opname(node)} affine writes {what} {{idx}} (weight[{{idx}}])"))
        if b is not None and bname is not None:
            a.contributions.append(Contribution(base + c, bname, 0, (c,), "in", f"{layer}: bias[{{idx}}]"))
    return lab


def _layer_of(a: Analysis, node: Node, w: Any) -> str:
    name = a.param_name(w)
    return module_of(name) if name else node.name


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
        for ch, s in enumerate(per_index(a.uf, lx, 1, c)):
            if s > 0:
                kind = "train" if op == "batch_norm" else "batch statistics"
                a.normalised.setdefault(s, []).append(
                    f"{layer}: {opname(node)} ({kind}) normalises channel {ch} over {_dims_text(nd, 1)}"
                )
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
        for ch, s in enumerate(per_index(a.uf, lx, 1, c)):
            if s > 0:
                a.normalised.setdefault(s, []).append(f"{layer}: {opname(node)} normalises channel {ch} per sample")
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
        uses = sum(1 for u in node.users if u in live_nodes for x in _flat_args(u) if x is node)
        if uses > 1 and name not in a.unusable:
            a.unusable[name] = f"shared: used by {uses} operations"
    for node in cap.graph.nodes:
        if node.op == "call_function" and node not in live_nodes and not opname(node).endswith("_"):
            a.dead.append(node)  # its value never reaches the loss nor Python: it constrains nothing
            a.env[node] = invariant_outputs(node)
            continue
        if node.op == "placeholder":
            if node not in cap.params:
                a.env[node] = invariant_outputs(node)
            continue
        if node.op == "output":
            for x in _flat_args(node):
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
    return a


__all__ = ["HANDLERS", "INVARIANT", "Analysis", "Contribution", "opname", "run_rules"]
