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

import operator
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


SHIFT_OPS = {"add", "sub", "mul", "div", "dropout", "mean", "sum"} | SAME_DIM_OPS | REPLAY_OPS | LINEAR_POOLS


def _reaching(graph: torch.fx.Graph, targets: set[str], through: set[str]) -> set[Node]:
    """Nodes with a path to an op in `targets` along which every op in between is in `through`.

    A cheap necessary condition that prunes the label replays: a writer outside this set cannot reach a
    softmax (or an attention score) through the ops that could carry its shift there.
    """
    stack = [n for n in graph.nodes if n.op == "call_function" and base_op(n) in targets]
    seen: set[Node] = set()
    while stack:
        n = stack.pop()
        for x in n.all_input_nodes:
            if x in seen:
                continue
            seen.add(x)
            if x.op == "call_function" and (base_op(x) in through or x.target is operator.getitem):
                stack.append(x)
    return seen


def find_translation_sites(a: Analysis) -> list[TranslationSite]:
    """Linear/Conv writers (ungrouped) whose output reaches a softmax only as a per-sample shift."""
    graph = a.cap.graph
    if not any(n.op == "call_function" and base_op(n) in SOFTMAX_OPS for n in graph.nodes):
        return []
    reach = _reaching(graph, SOFTMAX_OPS, SHIFT_OPS)
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
        if wname is None or node not in reach:
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


# ---- attention key bias ------------------------------------------------------------------------
ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention"}
MATMUL_OPS = {"matmul", "bmm"}
CARRY_OPS = SAME_DIM_OPS | {"dropout"}
"""Ops the key-bias search may pass (dropout only when inactive: see `_inactive_dropout`)."""


@dataclass(frozen=True)
class KeyBiasSite:
    """Bias coordinates of a Linear whose only effect is a per-query constant added to attention scores."""

    node: Node
    bias: str
    coords: tuple[int, ...]
    path: tuple[str, ...]


def _replay(user: Node, env: dict[Node, torch.Tensor]) -> object:
    """Run an index map on coordinate labels (tracked inputs) and zeros (every other tensor input)."""

    def sub(x: object) -> object:
        if isinstance(x, Node):
            if x in env:
                return env[x]
            v = x.meta.get("val")
            return torch.zeros(v.shape, dtype=torch.float64) if isinstance(v, torch.Tensor) else v
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        return x

    return user.target(*[sub(x) for x in user.args], **{k: sub(v) for k, v in user.kwargs.items()})  # type: ignore[operator]


def _inactive_dropout(node: Node) -> bool:
    """dropout(x, p, train) that is the identity (p == 0 or eval): a random mask would break a constant shift."""
    return float(arg(node, 1, "p", 0.5)) == 0.0 or not bool(arg(node, 2, "train", True))  # type: ignore[arg-type]


def _constant_along(lab: torch.Tensor, dim: int) -> bool:
    """True if every fibre of `lab` along `dim` holds one value (a shift of it is constant along `dim`)."""
    if lab.ndim == 0 or lab.shape[dim] <= 1:
        return True
    return bool((lab == lab.narrow(dim, 0, 1)).all())


def key_bias_coordinates(node: Node, n: int, path: list[str]) -> set[int]:
    """Output features j of a Linear (`node`, n features) whose constant shift reaches attention only as keys.

    Feature j's shift delta_j e_j (the same for every token) is followed through index maps (view, permute,
    select, split, ...) on label tensors (entry = feature index + 1). It is harmless where it enters
    - `scaled_dot_product_attention` as the key, constant along the key axis (dim -2): the scores
      q_i . (k_j + delta) = q_i . k_j + q_i . delta change by a per-query constant, which the softmax over
      keys ignores (additive masks, causal masks and dropout after the softmax do not change that);
    - `matmul(q, k^T)` as the right factor, constant along its last (key) axis, when the scores then reach
      a softmax over that axis only through shift-preserving ops (`shift_reaches_softmax`).
    A feature that reaches anything else (query, value, a nonlinearity, the output) is excluded.
    """
    from neural_mechanics.symmetry.rules import INDEX_MAPS

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
        op = base_op(u) if u.op == "call_function" else ""
        verdict: bool | None = None  # True good, False bad, None propagated
        val: object = None
        if op == "getitem":
            src = u.args[0]
            val = env.get(src)  # type: ignore[arg-type]
            if isinstance(val, (list, tuple)):
                env[u] = val[u.args[1]]  # type: ignore[index]
            else:
                verdict = False
        elif op in INDEX_MAPS or op in SAME_DIM_OPS or (op == "dropout" and _inactive_dropout(u)):
            if op == "dropout" or op in SAME_DIM_OPS:
                val = env[tracked[0]] if u.args[0] in env and len(tracked) == 1 else None
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
        elif op in ATTENTION_OPS:
            key = u.args[1] if len(u.args) > 1 else None
            q_v = [x for x in tracked if x is u.args[0] or (len(u.args) > 2 and x is u.args[2])]
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
        elif op in MATMUL_OPS and len(u.args) >= 2 and isinstance(u.args[1], Node) and u.args[1] in env \
                and u.args[0] not in env:
            lab = env[u.args[1]]
            sub_path: list[str] = []
            if _constant_along(lab, -1) and shift_reaches_softmax(u, ndim_of(u) - 1, sub_path, {}):
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
    """Linear biases (usable, used once) with coordinates that only ever shift attention keys."""
    from neural_mechanics.symmetry.rules import INDEX_MAPS

    reach = _reaching(a.cap.graph, ATTENTION_OPS | MATMUL_OPS, INDEX_MAPS | CARRY_OPS)
    sites = []
    for node in a.cap.graph.nodes:
        if node.op != "call_function" or base_op(node) != "linear" or node not in reach:
            continue
        b = arg(node, 2, "bias", None)
        bname = a.param_name(b)
        if bname is None or not a.usable(bname):
            continue
        n = shape_of(b)[0] if shape_of(b) else 0
        path: list[str] = []
        coords = key_bias_coordinates(node, n, path)
        if coords:
            sites.append(KeyBiasSite(node, bname, tuple(sorted(coords)), (
                f"{module_of(bname)}: {node.target} adds {bname}[j] to output feature j of every token",
                *dict.fromkeys(path))))
    return sites
