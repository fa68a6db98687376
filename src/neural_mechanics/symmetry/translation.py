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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from neural_mechanics.symmetry.graph import compress
from neural_mechanics.symmetry.rules import Analysis, arg, base_op, module_of, ndim_of, shape_of

SOFTMAX_OPS = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cross_entropy_loss"}
SAME_DIM_OPS = {"clone", "contiguous", "alias", "detach", "_to_copy", "to", "lift_fresh_copy"}
REPLAY_OPS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "permute",
              "transpose", "t", "expand", "movedim", "swapaxes", "swapdims", "view_as", "reshape_as"}
LINEAR_POOLS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "upsample_nearest1d",
                "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d",
                "upsample_trilinear3d"}


@dataclass(frozen=True)
class TranslationSite:
    """A writer whose output reaches a softmax as a per-sample shift."""

    node: Node
    weight: str | None
    bias: str | None
    n_in: int
    path: tuple[str, ...]


def softmax_dim(node: Node) -> int:
    x = node.args[0]
    nd = ndim_of(x)
    is_ce = base_op(node) == "cross_entropy_loss"
    d = (1 if nd >= 2 else 0) if is_ce else int(arg(node, 1, "dim", -1))
    return d % nd if nd else 0


def _replay_dims(node: Node, user: Node, dim: int) -> list[int]:
    """Output dims of `user` along which a shift constant along `dim` of `node` stays constant."""
    shape = shape_of(node)
    rows_shape = [s for i, s in enumerate(shape) if i != dim]
    n = 1
    for s in rows_shape:
        n *= s
    rows = torch.arange(n, dtype=torch.float64).view(rows_shape).unsqueeze(dim).expand(shape).contiguous()

    def sub(x: object) -> object:
        if x is node:
            return rows
        if isinstance(x, Node):
            v = x.meta.get("val")
            return torch.zeros(v.shape, dtype=torch.float64) if isinstance(v, torch.Tensor) else v
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        return x

    try:
        out = user.target(*[sub(x) for x in user.args], **{k: sub(v) for k, v in user.kwargs.items()})  # type: ignore[operator]
    except Exception:
        return []
    if not isinstance(out, torch.Tensor):
        return []
    comp = compress(out)
    return [d for d in range(out.ndim) if out.shape[d] > 1 and comp.shape[d] == 1]


def shift_reaches_softmax(node: Node, dim: int, path: list[str], memo: dict[tuple[Node, int], bool]) -> bool:
    """True if a shift of `node` constant along `dim` leaves every downstream use invariant."""
    key = (node, dim)
    if key in memo:
        return memo[key]
    memo[key] = False
    if not node.users:
        return False
    ok = True
    for u in node.users:
        if not ok:
            break
        op = base_op(u) if u.op == "call_function" else ""
        nd = ndim_of(node)
        if op in SOFTMAX_OPS:
            ok = u.args[0] is node and softmax_dim(u) == dim
            if ok:
                path.append(f"{u.target}: softmax over dim {dim} is invariant to a per-sample shift of the logits")
        elif op in ("add", "sub"):
            ok = shift_reaches_softmax(u, dim + ndim_of(u) - nd, path, memo)
        elif op in ("mul", "div"):
            other = u.args[1] if u.args[0] is node else u.args[0]
            ok = not isinstance(other, Node) and (op == "mul" or u.args[0] is node)
            ok = ok and shift_reaches_softmax(u, dim, path, memo)
        elif op in SAME_DIM_OPS or (op == "dropout" and not bool(arg(u, 2, "train", True))):
            ok = shift_reaches_softmax(u, dim, path, memo)
        elif op in ("mean", "sum"):
            dims = arg(u, 1, "dim", None)
            keep = bool(arg(u, 2, "keepdim", False))
            dims = [dims] if isinstance(dims, int) else list(dims or range(nd))
            dims = [d % nd for d in dims]
            ok = dim not in dims and shift_reaches_softmax(
                u, dim if keep else dim - sum(d < dim for d in dims), path, memo)
        elif op in LINEAR_POOLS:
            k = int(next(ch for ch in reversed(op) if ch.isdigit()))
            ok = dim < nd - k and shift_reaches_softmax(u, dim, path, memo)
        elif op in REPLAY_OPS:
            cands = _replay_dims(node, u, dim)
            ok = any(shift_reaches_softmax(u, d, path, memo) for d in cands)
            if ok:
                path.append(f"{u.target} carries the class axis along")
        else:
            ok = False
    memo[key] = ok
    return ok


def find_translation_sites(a: Analysis) -> list[TranslationSite]:
    """Linear/Conv writers (ungrouped) whose output reaches a softmax only as a per-sample shift."""
    graph = a.cap.graph
    if not any(n.op == "call_function" and base_op(n) in SOFTMAX_OPS for n in graph.nodes):
        return []
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = base_op(node)
        if op == "linear":
            x, w, b = node.args[0], node.args[1], arg(node, 2, "bias", None)
            dim = ndim_of(node) - 1
        elif op in ("conv1d", "conv2d", "conv3d") and int(arg(node, 6, "groups", 1)) == 1:
            x, w, b = node.args[0], node.args[1], arg(node, 2, "bias", None)
            dim = 1 if ndim_of(x) == len(shape_of(w)) else 0
        else:
            continue
        wname, bname = a.param_name(w), a.param_name(b)
        if wname is None:
            continue
        path: list[str] = []
        if not shift_reaches_softmax(node, dim, path, {}):
            continue
        sites.append(TranslationSite(
            node=node,
            weight=wname if a.usable(wname) else None,
            bias=bname if a.usable(bname) else None,
            n_in=shape_of(w)[1],
            path=(f"{module_of(wname)}: {node.target} writes the logits (class axis = dim {dim})",
                  *dict.fromkeys(reversed(path))),
        ))
    return sites
