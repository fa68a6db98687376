"""Run the op-rule table over a captured graph: label every node, uniting and tainting slots as ops demand.

The rules themselves (what each op does to channel slots, and why that is sound) are the op-rule table in
ops/ (one module per op family, registry.py for the record and the lookup); this module walks the graph
once in order, asks the table for each node's rule and applies it. Ops without a rule are barriers.
Before the walk it finds what constrains nothing (ops whose value never reaches the loss nor Python),
which parameters cannot be in a group (frozen, or used by several ops), and the parameters reshaped on
their way to a layer-scale product; after it, the attention contractions are resolved into query/key
pairs (ops/attention.py), once every class is final.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, flat_args, invariant_outputs, opname
from neural_mechanics.symmetry.capture import CapturedGraph
from neural_mechanics.symmetry.graph import taint
from neural_mechanics.symmetry.ops import Flag, OpRuleError, rule_of
from neural_mechanics.symmetry.ops.attention import resolve_contractions
from neural_mechanics.symmetry.ops.layer_scale import find_scale_chains
from neural_mechanics.symmetry.ops.rms_norm import find_rms_norms
from neural_mechanics.symmetry.ties import resolve_ties


def leaks(node: Node) -> bool:
    """Whether the node's value leaves the graph into Python (`.item()`, `if t:`): `Flag.LEAK`."""
    rule = rule_of(node)
    return rule is not None and Flag.LEAK in rule.flags


def _reaching_output(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose value flows into the output or leaks into Python (in-place ops are kept regardless).

    Everything else (a computed but unused branch) constrains nothing and is skipped.
    """
    seen: set[Node] = set()
    stack = [n for n in graph.nodes if n.op == "output" or leaks(n)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _apply(a: Analysis, node: Node) -> None:
    rule = rule_of(node)
    if rule is None or rule.channel is None:
        a.env[node] = a.barrier(node)
    elif rule.family != "user":
        a.env[node] = rule.channel(a, node)
    else:  # a user's handler: its failure is reported as such, not as a bug of the engine
        try:
            a.env[node] = rule.channel(a, node)
        except OpRuleError:
            raise
        except Exception as e:
            raise OpRuleError(f"the rule registered for {rule.op} failed on node {node.name}: "
                              f"{type(e).__name__}: {e}",
                              "fix the handler, or unregister_op the op (it is then a barrier)") from e


def run_rules(cap: CapturedGraph) -> Analysis:
    """Label every node of the captured graph, uniting and tainting slots as the ops demand."""
    a = Analysis(cap)
    for name, trainable in cap.trainable.items():
        if not trainable:
            a.unusable[name] = "frozen (requires_grad=False)"
    live_nodes = _reaching_output(cap.graph)
    tie_users: dict[Node, list[str]] = {}
    for node, name in cap.params.items():
        per_user = {u: sum(1 for x in flat_args(u) if x is node) for u in node.users if u in live_nodes}
        uses = sum(per_user.values())
        if uses > 1 and name not in a.unusable:
            a.tied[name] = uses
            a.tie_uses[name] = {}
            for u, k in per_user.items():
                tie_users.setdefault(u, []).append(name)
                if k > 1:
                    a.tie_twice.add(u)
    a.scale_chains = find_scale_chains(cap.graph, cap.params, live_nodes)
    in_chain = {c for _, chain in a.scale_chains.values() for c in chain}
    a.rms_norms = find_rms_norms(cap.graph, live_nodes)
    statistics = {s for norm in a.rms_norms.values() for s in norm.statistic}
    for node in cap.graph.nodes:
        if node in in_chain:  # a reshaped layer-scale parameter: handled by the product (layer_scale.py)
            a.env[node] = invariant_outputs(node)
            continue
        if node in statistics:  # an RMS norm's statistic: it feeds only the normalising product (rms_norm.py)
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
        start = len(a.contributions)
        _apply(a, node)
        for name in tie_users.get(node, ()):  # what this use of a tied parameter did with it (ties.py)
            a.tie_uses[name][node] = [c for c in a.contributions[start:] if c.param == name]
    a.ties = resolve_ties(a)
    resolve_contractions(a)
    return a


__all__ = ["Analysis", "leaks", "run_rules"]
