"""Elementwise ops, reductions and pooling: pass-through, mixing (add, reductions, pools), products.

- pass-through ops are positively homogeneous of degree 1 per entry, f(alpha x) = alpha f(x) for alpha > 0
  (relu, leaky_relu, dropout, abs, neg, copies, float casts): the output entry keeps the input entry's slot;
- add / sub / maximum / minimum of two activations and homogeneous reductions (sum, mean, amax, a norm)
  and pooling windows mix entries: the slots they mix are united (one class, scaled together);
- a product with something that does not move (a constant, a buffer, a frozen parameter) is a
  pass-through; a product with a parameter is a layer scale (layer_scale.py); anything else is a barrier.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, Labels, ndim_of, opname
from neural_mechanics.symmetry.graph import (
    collapse,
    compress,
    fit,
    invariant_label,
    live,
    taint,
    union_pairs,
    zero_label,
)
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.layer_scale import layer_scale_product
from neural_mechanics.symmetry.ops.registry import Flag, Shift, ShiftRule, canonical, register
from neural_mechanics.symmetry.ops.rms_norm import rms_normalise


def inactive_dropout(node: Node) -> bool:
    """dropout(x, p, train) is the identity: p == 0 or eval (a random mask would break a constant shift)."""
    args = op_args(node)
    return float(args.get("p", 0.5)) == 0.0 or not bool(args.get("train", True))


def float_cast(node: Node) -> bool:
    """A cast from a floating dtype to a floating dtype (rounding to integers is not homogeneous)."""
    x = op_args(node).get("input")
    vin = x.meta.get("val") if isinstance(x, Node) else None
    vout = node.meta.get("val")
    return (isinstance(vin, Tensor) and isinstance(vout, Tensor) and vin.dtype.is_floating_point
            and vout.dtype.is_floating_point)


def exact_division(node: Node) -> bool:
    """x / c without a rounding mode (floor or trunc of a quotient is not homogeneous)."""
    return op_args(node).get("rounding_mode") is None


@register("relu", "leaky_relu", "abs", "prelu", "_prelu_kernel")
@register("clone", "contiguous", "alias", shift=Shift.SAME, flags={Flag.REARRANGE})
@register("detach", "lift_fresh_copy", "positive", "neg", shift=Shift.SAME)
@register("dropout", "feature_dropout", shift=ShiftRule(Shift.SAME, inactive_dropout, "p == 0 or eval"))
def h_pass_through(a: Analysis, node: Node) -> Labels:
    """pass-through: positively homogeneous per entry, the output entry keeps the input entry's slot."""
    return fit(a.lab(op_args(node)["input"]), ndim_of(node))


@register("_to_copy", "to", "type_as", shift=ShiftRule(Shift.SAME, float_cast, "float to float"))
def h_cast(a: Analysis, node: Node) -> Labels:
    """pass-through for a cast between floating dtypes; a cast to an integer dtype is a barrier."""
    lab = a.lab(op_args(node)["input"])
    if live(lab) and not float_cast(node):
        return a.barrier(node)
    return fit(lab, ndim_of(node))


@register("add", "sub", shift=Shift.SUM)
@register("maximum", "minimum")
def h_add(a: Analysis, node: Node) -> Labels:
    """mixing: x + y, x - y, max(x, y) unite the slots met at each position; a non-zero constant taints."""
    nd = ndim_of(node)
    args = op_args(node)
    x, y = args["input"], args.get("other")
    if not isinstance(x, Node):
        x, y = y, x
    if not isinstance(y, Node):
        lab = a.lab(x, nd)
        if y not in (0, 0.0, False):
            if live(lab):
                a.note_blocked(node, f"{opname(node)} (non-zero constant)")
            taint(a.uf, lab)
        return lab
    lx, ly = a.lab(x, nd), a.lab(y, nd)
    text = f"{opname(node)} ({node.name}) sums two branches channel by channel"
    for s, _t in union_pairs(a.uf, lx, ly):
        a.couplings.append((s, text))
    lx2, ly2 = torch.broadcast_tensors(lx, ly)
    return compress(torch.where(lx2 >= 0, lx2, ly2))


def _product(a: Analysis, node: Node, divide: bool) -> Labels:
    if node in a.rms_norms:  # x * rsqrt(mean(x**2) + eps): a normaliser (rms_norm.py)
        return rms_normalise(a, a.rms_norms[node])
    nd = ndim_of(node)
    args = op_args(node)
    x, y = args["input"], args["other"]
    if not isinstance(y, Node):
        return a.lab(x, nd)
    if not isinstance(x, Node):  # scalar * tensor is not produced by ATen, but be safe
        return a.barrier(node) if divide else a.lab(y, nd)
    if not divide:
        scaled = layer_scale_product(a, node, x, y)
        if scaled is not None:
            return scaled
    lx, ly = a.lab(x, nd), a.lab(y, nd)
    if not a.moving(ly):  # x * c, x / c: linear in x (SwiGLU's silu(gate) * up: up passes)
        return compress(torch.broadcast_tensors(lx, ly)[0])
    if not divide and not a.moving(lx):
        return compress(torch.broadcast_tensors(ly, lx)[0])
    return a.barrier(node)


@register("mul", shift=ShiftRule(Shift.SCALAR_FACTOR, None, "by a constant"))
def h_mul(a: Analysis, node: Node) -> Labels:
    """pass-through: x * c for c that does not move; x * p with a parameter p is a layer scale (reader and writer)."""
    return _product(a, node, divide=False)


@register("div", "true_divide", shift=ShiftRule(Shift.SCALAR_FACTOR, exact_division, "by a constant, no rounding"))
def h_div(a: Analysis, node: Node) -> Labels:
    """pass-through: x / c for c that does not move; a rounding mode (floor, trunc) is a barrier."""
    if not exact_division(node):
        return a.barrier(node)
    return _product(a, node, divide=True)


@register("clamp", "clamp_min")
def h_clamp(a: Analysis, node: Node) -> Labels:
    """pass-through for clamp(x, min=0) (a relu); any other bound breaks homogeneity: a barrier."""
    args = op_args(node)
    lo, hi = args.get("min"), args.get("max")
    if not isinstance(lo, Node) and lo in (0, 0.0) and hi is None:
        return h_pass_through(a, node)
    return a.barrier(node)


@register("mean", "sum", shift=ShiftRule(Shift.LINEAR_REDUCE, None, "over other axes"))
@register("amax", "amin", "linalg_vector_norm", "nansum")
def h_reduce(a: Analysis, node: Node) -> Labels:
    """mixing: a homogeneous reduction over `dim` unites what it reduces; the dims go unless keepdim."""
    args = op_args(node)
    x = args["input"]
    nd = ndim_of(x)
    dims = args.get("dim")
    keep = bool(args.get("keepdim", False))
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


def spatial_dims(node: Node) -> int:
    """k of a pooling / interpolation op over the trailing k dims: the last digit of its name (avg_pool2d -> 2)."""
    name = canonical(node) or opname(node)
    return int(next(ch for ch in reversed(name) if ch.isdigit()))


LINEAR_POOLS = ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "upsample_nearest1d",
                "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
                "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
                "upsample_bicubic2d", "upsample_trilinear3d")
"""Pooling and interpolation that are linear in their input (averages, copies, fixed interpolation weights)."""


@register(*LINEAR_POOLS, shift=ShiftRule(Shift.LINEAR_POOL, None, "class axis not pooled"))
@register("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
          "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
def h_pool(a: Analysis, node: Node) -> Labels:
    """mixing: pooling / interpolation is positively homogeneous and mixes only the trailing k spatial dims."""
    k = spatial_dims(node)
    x = op_args(node)["input"]
    nd = ndim_of(x)
    lab = collapse(a.uf, a.lab(x, nd), list(range(nd - k, nd)))
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return [lab, invariant_label(nd)]
    return lab


@register("zeros", "zeros_like", "new_zeros")
def h_zero_factory(a: Analysis, node: Node) -> Labels:
    """zero factory: a known zero (ZERO label), which adds nothing where it is summed or concatenated."""
    return zero_label(ndim_of(node))
