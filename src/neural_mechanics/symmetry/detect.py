"""`find_symmetries`: capture the model + loss, run the op rules, assemble the channel classes into groups.

The pipeline: capture.py traces `loss(model(*inputs))` into an ATen graph; rules.py runs the op-rule table (ops/)
over it, labelling channel slots, uniting those that scale together and recording which parameter slices write or
read them (analysis.py); assembly.py turns the classes into scale / rescale groups and the translation sites into
translation groups; this module adds what the user sees next to the groups (meta: coverage, blocked ops,
warnings) and `describe_graph`, the per-node view of the same run. Nothing here looks at parameter names except
to report them: all structure comes from the captured graph.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from neural_mechanics.symmetry.analysis import Analysis, opname
from neural_mechanics.symmetry.assembly import channel_groups, qk_groups, translation_groups
from neural_mechanics.symmetry.capture import capture
from neural_mechanics.symmetry.coverage import covered_entries
from neural_mechanics.symmetry.graph import INVARIANT
from neural_mechanics.symmetry.groups import Symmetry, SymmetrySet
from neural_mechanics.symmetry.kinds import get_kind
from neural_mechanics.symmetry.loss import LossLike
from neural_mechanics.symmetry.ops import rule_of
from neural_mechanics.symmetry.rules import leaks, run_rules

EVAL_BN_WARNING = (
    "eval-mode BatchNorm ({layers}) normalises with running statistics, so it is an affine map with no "
    "scale symmetry (and it blocks rescale symmetries through it); call model.train() before "
    "find_symmetries to analyse the symmetries that hold during training"
)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while tens of thousands of small group objects are built.

    They hold no cycles; without the pause, generation-2 passes over the (large) torch heap took about
    half of the detection time on resnet18.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def find_symmetries(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss: LossLike = "cross_entropy",
    kinds: Iterable[str] | None = None,
) -> SymmetrySet:
    """Find the translation, scale and rescale symmetries of `loss(model(*example_inputs))`.

    example_inputs: a tensor or a tuple of tensors (one batch, batch size >= 2 for train-mode BatchNorm).
    loss: "cross_entropy" / "softmax" (outputs are logits fed to a softmax over dim 1), "mse" / None
    (no softmax, no translation symmetry), a callable loss(outputs) -> scalar captured with the model, or a
    LossSpec (the same loss argument as certify and check_constraints; symmetry/loss.py).
    kinds: restrict to these kinds (default all). The model is not modified (parameters, buffers,
    train/eval mode and the global RNG state are left as they were); detection follows its current
    mode: train-mode BatchNorm gives scale symmetries, eval-mode BatchNorm does not.
    """
    wanted: set[str] | None = None if kinds is None else {str(get_kind(k).name) for k in kinds}
    with _gc_paused():
        return _find(model, example_inputs, loss, wanted)


def _find(model: nn.Module, example_inputs: Any, loss: LossLike, wanted: set[str] | None) -> SymmetrySet:
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, loss)
    a = run_rules(cap)
    meta: dict[str, Any] = {
        "model": type(model).__name__,
        "capture": cap.mechanism,
        "input_shapes": [list(s) for s in cap.input_shapes],
        "loss": cap.loss,
        "loss_detail": cap.loss_detail,
        "training": bool(model.training),
        "graph_nodes": len(cap.graph.nodes),
        "frozen": [n for n, why in a.unusable.items() if why.startswith("frozen")],
        "shared": list(a.tied),
        "tied": {t.param: "joint over all uses" if t.joint else f"blocked: {t.reason}" for t in a.ties},
        "blocked_ops": dict(a.blocked),
        "warnings": [],
    }
    groups: list[Symmetry] = []
    if wanted is None or wanted & {"scale", "rescale"}:
        groups += channel_groups(a, meta)
        groups += qk_groups(a, {g.name for g in groups})
        meta["query_key_pairs"] = len(a.qk_pairs)
    if wanted is None or "translation" in wanted:
        groups += translation_groups(a)
    if wanted is not None:
        groups = [g for g in groups if g.kind in wanted]
    meta["coverage"] = _coverage(a, groups, model)
    if a.eval_batchnorm:
        layers = ", ".join(dict.fromkeys(a.eval_batchnorm))
        if len(layers) > 120:
            layers = layers[:117] + "..."
        meta["warnings"].append(EVAL_BN_WARNING.format(layers=layers))
    leaked = [n for n in cap.graph.nodes if leaks(n)]
    if leaked:
        meta["warnings"].append(
            f"the forward reads {len(leaked)} activation value(s) into Python (.item(), `if tensor:`, .numpy()): "
            "control flow was recorded for the branch these example inputs take, and every channel whose "
            "value reaches Python is treated as blocked")
    joint = [t.param for t in a.ties if t.joint]
    blocked = [t.param for t in a.ties if not t.joint]
    if joint:
        meta["warnings"].append(
            f"tied parameters (used by more than one operation) move jointly over all their uses, which breaks "
            f"the groups each use alone would have (e.g. a residual-stream scale group or a head's softmax "
            f"translations) and leaves them out of every translation group: {joint}")
    if blocked:
        meta["warnings"].append(
            f"parameters used by more than one operation, whose uses cannot scale together, are left out of "
            f"every group: {blocked}")
    meta["seconds"] = round(time.perf_counter() - t0, 4)
    return SymmetrySet(groups, meta)


def _coverage(a: Analysis, groups: list[Symmetry], model: nn.Module) -> dict[str, Any]:
    """meta["coverage"] (symmetry/coverage.py): parameter entries in groups, and what blocked the rest.

    An op counted in `a.blocked` at a node without a rule is unsupported (the user can teach it); at a node with
    a rule it is a known barrier, whose reason is the rule's summary (ops/barriers.py for the ops that block by
    their nature; the handler's own line for a rule that decided to block, e.g. eval-mode BatchNorm).
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    total = sum(math.prod(s) for s in shapes.values())
    inside = sum(covered_entries(groups, shapes).values())
    unsupported: dict[str, None] = {}
    barriers: dict[str, str] = {}
    for node, keys in a.blocked_at.items():
        rule = rule_of(node)
        for key in keys:
            if rule is None:
                unsupported[key.split(" (", 1)[0]] = None
            else:
                barriers.setdefault(key, rule.summary)
    return {
        "params_total": total,
        "params_in_groups": inside,
        "param_fraction": inside / total if total else 0.0,
        "blocked_ops": dict(a.blocked),
        "unsupported_ops": sorted(unsupported),
        "barrier_ops": dict(sorted(barriers.items())),
    }


def describe_graph(model: nn.Module, example_inputs: Any, *, loss: LossLike = "cross_entropy") -> str:
    """One line per captured op: its shape, its rule and what the rules made of its channels (for debugging).

    rule = the family of the op's rule in the op-rule table (docs/ops.md; "user" for `register_op` rules,
    "none: barrier" for an op the engine does not know); slots = live channel slots at the node, classes =
    distinct classes among them, tainted = how many of those classes cannot be scaled (joined to
    INVARIANT). A node where moving channels were stopped ends with "<- blocked: ..." and the reason, as
    counted in `SymmetrySet.meta["blocked_ops"]`: the barrier that cost those channels their groups.
    """
    with _gc_paused():
        cap = capture(model, example_inputs, loss)
        a = run_rules(cap)
    rows = [f"{'node':<24} {'op':<40} {'rule':<14} {'shape':<22} slots classes tainted"]
    for node in cap.graph.nodes:
        if node.op not in ("call_function", "placeholder"):
            continue
        lab = a.env.get(node)
        shape = node.meta.get("val")
        shape_text = str(tuple(shape.shape)) if hasattr(shape, "shape") else "-"
        op = "placeholder" if node.op == "placeholder" else opname(node)
        rule = rule_of(node)
        family = "-" if node.op == "placeholder" else rule.family if rule is not None else "none: barrier"
        if node in cap.params:
            op = f"param {cap.params[node]}"
        if node in a.dead:
            op += " (unused)"
        head = f"{node.name:<24} {op:<40} {family:<14} {shape_text:<22}"
        if isinstance(lab, Tensor):
            slots = [int(s) for s in lab.unique().tolist() if s > 0]
            roots = {a.uf.find(s) for s in slots}
            tainted = sum(1 for r in roots if r == INVARIANT)
            row = f"{head} {len(slots):>5} {len(roots):>7} {tainted:>7}"
        else:
            row = f"{head}     -       -       -"
        if node in a.blocked_at:
            row += "  <- blocked: " + ", ".join(dict.fromkeys(a.blocked_at[node]))
        rows.append(row)
    return "\n".join(rows)
