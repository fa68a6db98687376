"""Op arguments by name: torch.fx's normalisation of a node's arguments, with its signature cached per op.

`op_args(node)["groups"]` instead of `node.args[8]`: rules read arguments by their schema names, so one
rule serves every overload and every op with the same argument names (a user's custom op included),
and a missing optional argument reads as its default.

The names are torch.fx's (`torch.fx.operator_schemas`, as `Node.normalized_arguments` and
`normalize_function` give them): the schema's names, except that `self` is called `input`, so the
principal tensor of almost every op is `input`. The signature of each op is built once
(`get_signature_for_torch_op`) and bound by position here, which gives the same mapping as
`normalize_function(..., normalize_to_only_use_kwargs=True)` (tests/test_ops_registry.py checks it on
whole captured models) at a fraction of its cost: the rules ask for the arguments of every node, and
detection must not get slower for it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch.fx import Node
from torch.fx.operator_schemas import get_signature_for_torch_op, normalize_function

Layout = tuple[tuple[str, ...], dict[str, Any]]
"""(names of the positional parameters in order, {name: default} for every parameter that has one)."""


@functools.cache
def _layout(target: Any) -> Layout | None:
    """The positional names and defaults of an op with exactly one schema (None: no schema to use)."""
    try:
        sigs = get_signature_for_torch_op(target)
    except Exception:  # not an operator torch.fx knows
        return None
    if not sigs or len(sigs) != 1:
        return None
    params = sigs[0].parameters.values()
    positional = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return positional, defaults


def op_args(node: Node) -> dict[str, Any]:
    """The node's arguments by name, defaults filled in (positional names "arg0", ... without a schema)."""
    try:
        layout = _layout(node.target)
    except TypeError:  # an unhashable target
        layout = None
    if layout is not None and len(node.args) <= len(layout[0]):
        names, defaults = layout
        out = dict(defaults)
        out.update(zip(names, node.args, strict=False))  # args may stop before the names do
        out.update(node.kwargs)
        return out
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)  # type: ignore[arg-type]
    if pair is not None:
        return dict(pair.kwargs)
    out = {f"arg{i}": a for i, a in enumerate(node.args)}
    out.update(node.kwargs)
    return out
