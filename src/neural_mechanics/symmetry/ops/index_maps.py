"""Index maps and reshapes: ops that only move entries (view, permute, cat, split, pad, channel shuffle...).

An index map sends each output entry to one input entry (or to a constant), so under a group action an
output entry scales with the entry it came from: the op is replayed on the label tensors themselves
(graph.py), the way pruning dependency graphs map indices, and the labels that land at an output position
say which channel it came from. The replay runs the op on float64 labels expanded to the real shapes
(exact for slot ids < 2**53); the common single-input maps (dims only, reshapes, expand, select, squeeze)
have cheap paths that act on the compressed labels directly. Zero padding writes ZERO (a known zero,
which adds nothing); padding with another constant is a barrier for its input.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.analysis import (
    Analysis,
    Labels,
    flat_list,
    invariant_outputs,
    opname,
    replay_op,
    shape_of,
)
from neural_mechanics.symmetry.graph import ZERO, compress, fit, slots_in, taint
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.registry import Flag, OpRuleError, Shift, register

FastPath = Callable[[Node, Tensor, tuple[int, ...], Tensor], Labels | None]
"""fast(node, compressed input labels, input shape, output value) -> labels, or None to replay instead."""


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


def _to_labels(out: Any) -> Labels:
    if isinstance(out, Tensor):
        return compress(out.to(torch.long))
    if isinstance(out, (list, tuple)):
        return [_to_labels(o) for o in out]
    return None


def _replay(a: Analysis, node: Node, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Labels:
    """Replay the op on float64 label tensors expanded to the real shapes (exact for ids < 2**53)."""

    def labels(x: Node, v: Tensor) -> Tensor:
        return a.lab(x, v.ndim).to(torch.float64).expand(v.shape).contiguous()

    try:
        out = replay_op(node, labels, args, kwargs)
    except Exception:
        return a.barrier(node)
    return _to_labels(out)


def _single_source(a: Analysis, node: Node, fast: FastPath | None = None) -> Labels:
    """A map whose output entries are all entries of its one tensor input: the cheap paths, else the replay."""
    x = op_args(node).get("input")
    if isinstance(x, Node) and isinstance(x.meta.get("val"), Tensor):
        in_shape = shape_of(x)
        if in_shape and not any(s == 0 for s in in_shape):
            lab = a.lab(x, len(in_shape))
            out = node.meta.get("val")
            if lab.numel() == 1:  # one label everywhere: any rearrangement keeps it
                if isinstance(out, Tensor):
                    return lab.reshape((1,) * out.ndim)
                if isinstance(out, (list, tuple)) and all(isinstance(o, Tensor) for o in out):
                    return [lab.reshape((1,) * o.ndim) for o in out]
            elif fast is not None and isinstance(out, Tensor) and not any(s == 0 for s in out.shape):
                labels = fast(node, lab, in_shape, out)
                if labels is not None:
                    return labels
    return _replay(a, node)


@register("permute", "transpose", "t", "unsqueeze", "movedim", "moveaxis", "swapaxes", "swapdims",
          shift=Shift.INDEX_MAP, flags={Flag.REARRANGE})
def h_dims(a: Analysis, node: Node) -> Labels:
    """index map (moves dims): applied to the compressed labels directly."""
    return _single_source(a, node, lambda n, lab, _s, _o: n.target(lab, *n.args[1:], **n.kwargs))  # type: ignore[operator]


@register("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as",
          shift=Shift.INDEX_MAP, flags={Flag.REARRANGE})
def h_reshape(a: Analysis, node: Node) -> Labels:
    """index map (reshape): row-major reshape of the compressed labels."""
    return _single_source(a, node, lambda _n, lab, s, out: _reshape_labels(lab, s, tuple(int(d) for d in out.shape)))


@register("expand", shift=Shift.INDEX_MAP, flags={Flag.REARRANGE})
def h_expand(a: Analysis, node: Node) -> Labels:
    """index map (broadcast): the compressed labels, left-padded to the output rank."""
    return _single_source(a, node, lambda _n, lab, _s, out: fit(lab, out.ndim))


def _select(node: Node, lab: Tensor, in_shape: tuple[int, ...], _out: Tensor) -> Labels:
    args = op_args(node)
    dim, i = int(args["dim"]) % len(in_shape), int(args["index"])
    return compress(lab.select(dim, 0 if lab.shape[dim] == 1 else i))


@register("select", shift=Shift.INDEX_MAP)
def h_select(a: Analysis, node: Node) -> Labels:
    """index map (select one index): the compressed labels at that index."""
    return _single_source(a, node, _select)


def _squeeze(node: Node, lab: Tensor, in_shape: tuple[int, ...], _out: Tensor) -> Labels:
    dims = op_args(node).get("dim")
    dims = range(len(in_shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    for d in sorted({d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1}, reverse=True):
        lab = lab.squeeze(d)
    return lab


@register("squeeze", shift=Shift.INDEX_MAP, flags={Flag.REARRANGE})
def h_squeeze(a: Analysis, node: Node) -> Labels:
    """index map (drop size-1 dims): the compressed labels without them."""
    return _single_source(a, node, _squeeze)


@register("expand_as", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "repeat",
          "flip", "roll", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
          "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
          "replication_pad3d", "unfold", shift=Shift.INDEX_MAP)
def h_index_map(a: Analysis, node: Node) -> Labels:
    """index map: replayed on the label tensors."""
    return _single_source(a, node)


@register("im2col", shift=Shift.INDEX_MAP)
def h_im2col(a: Analysis, node: Node) -> Labels:
    """index map with zero padding: replayed on the label tensors (padding reads ZERO)."""
    return _replay(a, node)


@register("pad", "constant_pad_nd", shift=Shift.INDEX_MAP)
def h_pad(a: Analysis, node: Node) -> Labels:
    """index map: zero padding writes ZERO; reflect/replicate replay; padding with a non-zero constant taints."""
    named = op_args(node)
    args, kwargs = list(node.args), dict(node.kwargs)
    if named.get("mode", "constant") == "constant":
        if named.get("value") not in (None, 0, 0.0):
            taint(a.uf, a.lab(named["input"]))
            return invariant_outputs(node)
        args = [*args[:2], "constant", float(ZERO)] if "mode" in named else [*args[:2], float(ZERO)]
        kwargs.pop("mode", None)
        kwargs.pop("value", None)
    return _replay(a, node, args, kwargs)


@register("cat", "concat", "concatenate", "stack", "hstack", "vstack", shift=Shift.INDEX_MAP)
def h_concat(a: Analysis, node: Node) -> Labels:
    """index map (concatenation): replayed; every slot that lands in the output is coupled to the others."""
    labels = _replay(a, node)
    if isinstance(labels, Tensor):
        named = op_args(node)
        text = (f"{opname(node)} ({node.name}) concatenates {len(named['tensors'])} inputs along dim "
                f"{named.get('dim', 0)}")
        for slot in slots_in(labels):
            a.couplings.append((slot, text))
    return labels


@register(operator.getitem.__name__, shift=Shift.INDEX_MAP)
def h_getitem(a: Analysis, node: Node) -> Labels:
    """index map: one output of a multi-output op (Python's getitem, read by position)."""
    src = a.env.get(node.args[0])  # type: ignore[arg-type]
    i = node.args[1]
    if isinstance(src, list) and isinstance(i, int):
        return src[i]
    return invariant_outputs(node)


def h_checked_replay(a: Analysis, node: Node) -> Labels:
    """index map declared by a user: replayed on the labels l and on f(l) = l**2 + K, which tells moves from the rest.

    An output entry that moved from an input entry with label l reads l in the first replay and f(l) in the
    second; a constant (padding) reads the same in both and does not move (INVARIANT). Anything else (an
    average of entries with different labels, a product) means the op combines values, so the declaration
    is wrong (OpRuleError). Labels are exact in float64 (l**2 < 2**53).
    """
    values = [x for x in flat_list([node.args, node.kwargs]) if isinstance(x, Node)]
    top = max((int(a.lab(x).max()) for x in values if isinstance(x.meta.get("val"), Tensor)), default=0)
    k = float(2 ** (2 * max(top, 1).bit_length() + 1))

    def relabel(lab: Tensor) -> Tensor:
        return torch.where(lab > 0, lab * lab + k, lab)

    def labels(second: bool) -> Callable[[Node, Tensor], Tensor]:
        def value(x: Node, v: Tensor) -> Tensor:
            if not v.dtype.is_floating_point:
                raise OpRuleError(
                    f"{opname(node)} ({node.name}) was registered as an index map, but it takes a {v.dtype} tensor "
                    f"({x.name}): the replay on channel labels cannot know the values of such an input",
                    "give the op a handler of its own (docs/extending.md), or leave it unregistered (a barrier)")
            lab = a.lab(x, v.ndim).to(torch.float64).expand(v.shape)
            return (relabel(lab) if second else lab).contiguous()

        return value

    try:
        outs = [replay_op(node, labels(second)) for second in (False, True)]
    except OpRuleError:
        raise
    except Exception:
        return a.barrier(node)

    def merge(o0: Any, o1: Any) -> Labels:
        if isinstance(o0, Tensor) and isinstance(o1, Tensor):
            o0, o1 = o0.to(torch.float64), o1.to(torch.float64)
            same = o0 == o1
            moved = (o0 > 0) & (o0 == o0.round()) & (o1 == relabel(o0))
            if not bool((same | moved).all()):
                raise OpRuleError(
                    f"{opname(node)} ({node.name}) was registered as an index map, but replaying it on channel "
                    "labels combined values", "register it with a rule that matches what it computes (see "
                    "docs/extending.md), or leave it unregistered (a barrier)")
            return compress(torch.where(moved, o0, torch.zeros_like(o0)).to(torch.long))
        if isinstance(o0, (list, tuple)) and isinstance(o1, (list, tuple)):
            return [merge(x, y) for x, y in zip(o0, o1, strict=True)]
        return None

    return merge(*outs)
