"""Normalisation layers: BatchNorm, LayerNorm / RMSNorm, GroupNorm, InstanceNorm. Normalisers and affine writers.

A normaliser divides by a statistic of its input computed over a normalisation group (train-mode
BatchNorm: one channel over the batch and space; LayerNorm/RMSNorm: one row's trailing dims; GroupNorm:
one group of channels; InstanceNorm: one channel per sample). Its output is unchanged when a whole
normalisation group scales together, so the slots of each group are united and recorded as normalised
(a class with no reader but a normaliser is a scale group). Eval-mode BatchNorm uses running statistics:
an affine map with no such invariance, a barrier. The affine parameters write fresh slots
(out_c = w_c * xhat_c + b_c, xhat invariant).
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
    dims_text,
    module_of,
    ndim_of,
    opname,
    shape_of,
)
from neural_mechanics.symmetry.graph import collapse, invariant_label, live, per_index, slots_in, taint
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.linear import weight_bias, write_rows
from neural_mechanics.symmetry.ops.registry import register


def _affine_writer(a: Analysis, node: Node, w: Any, b: Any, n: int, nd: int, dim: int, what: str) -> Labels:
    """out_c = w_c * xhat_c + b_c with xhat invariant: w[c], b[c] write a fresh slot c."""
    if w is None:
        return invariant_label(nd)
    wname, w_ok, bname, b_ok = weight_bias(a, w, b)
    if wname is None or not (w_ok and b_ok) or (b is not None and bname is None):
        return invariant_label(nd)
    layer = module_of(wname)
    base, lab = a.fresh(n, nd, dim)
    write_rows(a, base, n, wname, bname if b is not None else None,
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


@register("batch_norm")
def h_batch_norm(a: Analysis, node: Node) -> Labels:
    """normaliser: train mode normalises channel c over (N, spatial); eval mode is affine, a barrier."""
    args = op_args(node)
    x, w, b = args["input"], args["weight"], args["bias"]
    nd = ndim_of(x)
    c = shape_of(x)[1]
    layer = _layer_of(a, node, w)
    lx = a.lab(x, nd)
    if bool(args["training"]):
        what = f"{layer}: {opname(node)} (train)"
        over = dims_text(nd, 1)
        _normalise_channels(a, lx, c, lambda ch: f"{what} normalises channel {ch} over {over}")
    else:
        a.eval_batchnorm.append(layer)
        if live(lx):
            a.note_blocked(node, f"{opname(node)} (eval mode: running statistics)")
        taint(a.uf, lx)
    return _affine_writer(a, node, w, b, c, ndim_of(node), 1, "channel")


@register("layer_norm", "rms_norm")
def h_layer_norm(a: Analysis, node: Node) -> Labels:
    """normaliser: LayerNorm / RMSNorm normalise every row's trailing dims jointly (their slots united)."""
    args = op_args(node)
    x, shape = args["input"], list(args["normalized_shape"])
    w, b = args.get("weight"), args.get("bias")
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
    wname, w_ok, bname, b_ok = weight_bias(a, w, b)
    if wname is None or not (w_ok and b_ok):
        return invariant_label(nd)
    slot = a.uf.new(1)
    a.contributions.append(Contribution(slot, wname, None, None, "in", f"{layer}: {opname(node)} affine (weight)"))
    if b is not None and bname is not None:
        a.contributions.append(Contribution(slot, bname, None, None, "in", f"{layer}: bias"))
    return torch.full((1,) * nd, slot, dtype=torch.long)


@register("group_norm")
def h_group_norm(a: Analysis, node: Node) -> Labels:
    """normaliser: GroupNorm normalises the channels of one group (and their spatial extent) jointly."""
    args = op_args(node)
    x, groups = args["input"], int(args["num_groups"])
    w, b = args.get("weight"), args.get("bias")
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


@register("instance_norm")
def h_instance_norm(a: Analysis, node: Node) -> Labels:
    """normaliser: InstanceNorm with input statistics normalises each channel per sample; else a barrier."""
    args = op_args(node)
    x, w, b = args["input"], args["weight"], args["bias"]
    nd = ndim_of(x)
    c = shape_of(x)[1]
    layer = _layer_of(a, node, w)
    lx = a.lab(x, nd)
    if bool(args["use_input_stats"]):
        _normalise_channels(a, lx, c, lambda ch: f"{layer}: {opname(node)} normalises channel {ch} per sample")
    else:
        taint(a.uf, lx)
    return _affine_writer(a, node, w, b, c, ndim_of(node), 1, "channel")
