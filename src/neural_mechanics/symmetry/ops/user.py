"""`register_op`: teach the engine how an op it does not know (a `torch.library` custom op) treats channels.

    import neural_mechanics as nm
    nm.register_op("mylib::my_relu", "pass_through")     # in force until unregister_op / the handle's remove()
    with nm.register_op(torch.ops.mylib.my_relu, "pass_through"):
        nm.find_symmetries(model, x)                       # groups through my_relu are found

A rule is one of the ready rules (`READY_RULES`), the name of an op whose rule to reuse ("aten::linear",
for an op with the same argument names), a channel handler `handler(analysis, node) -> labels`, or a
whole `OpRule`. Registering is validated (the op must exist, the rule must be one of those) and never
silently replaces a rule: pass `replace=True` to override a builtin or an earlier user rule. See
docs/extending.md for a worked example.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
from torch.fx import Node

from neural_mechanics.symmetry.analysis import Analysis, Labels, flat_list, ndim_of
from neural_mechanics.symmetry.graph import fit, live
from neural_mechanics.symmetry.ops import registry
from neural_mechanics.symmetry.ops.index_maps import h_checked_replay
from neural_mechanics.symmetry.ops.registry import ChannelRule, OpRule, OpRuleError, Shift, ShiftRule


def _first_input_passes(a: Analysis, node: Node) -> Labels:
    """The output entry keeps the slot of the first argument's entry; other moving inputs make it a barrier."""
    x = node.args[0] if node.args else None
    for other in flat_list([node.args[1:], node.kwargs]):
        if isinstance(other, Node) and other not in a.cap.params and live(a.lab(other)):
            return a.barrier(node)
    return fit(a.lab(x), ndim_of(node))


READY_RULES: dict[str, OpRule] = {
    "pass_through": OpRule(
        "", _first_input_passes, None, family="user",
        summary="pass-through: positively homogeneous per entry of its first argument, f(a x) = a f(x) for a > 0 "
                "(a relu-like activation); other arguments must not move"),
    "identity": OpRule(
        "", _first_input_passes, ShiftRule(Shift.SAME), family="user",
        summary="identity: returns its first argument's values (a copy, a hook, a float cast); also carries "
                "a softmax shift"),
    "index_map": OpRule(
        "", h_checked_replay, ShiftRule(Shift.INDEX_MAP), family="user",
        summary="index map: only moves or copies entries of its floating-point inputs, or writes constants "
                "(a custom view, permute, pad, concat); replayed on channel labels"),
    "barrier": OpRule("", None, None, family="user", summary="barrier: no symmetry passes it (the default)"),
}
"""The vocabulary of `register_op` (each a rule without an op)."""


def op_key_of(op: Any) -> str:
    """The registry key of an op given as a custom op, torch.ops.ns.name(.overload) or "ns::name"."""
    if isinstance(op, str):
        if "::" not in op and "." not in op:
            raise OpRuleError(f"register_op got the op name {op!r} without a namespace",
                              "name it as 'namespace::name', e.g. 'mylib::my_relu' or 'aten::gelu'")
        key = registry.qualified(op)
        if not registry.op_exists(key):
            raise OpRuleError(f"no operator {key!r} is defined",
                              "define it with torch.library.custom_op (or import the module that does) before "
                              "registering its rule, and check the spelling 'namespace::name'")
        return key
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or isinstance(
            getattr(op, "_qualname", None), str):
        found = registry.op_key(op)
        if found is not None:
            return found
    if isinstance(op, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        raise OpRuleError(
            f"register_op got the Python function {getattr(op, '__name__', op)!r}, not an operator",
            "the capture traces through Python functions, so their ATen ops are what the rules see; register "
            "operators: a torch.library.custom_op, torch.ops.<namespace>.<name>, or 'namespace::name'")
    raise OpRuleError(f"register_op cannot use {op!r} as an op",
                      "pass a torch.library.custom_op, torch.ops.<namespace>.<name>, or 'namespace::name'")


def _rule(key: str, rule: Any) -> OpRule:
    if isinstance(rule, OpRule):
        return dataclasses.replace(rule, op=key, family="user")
    if isinstance(rule, str):
        if rule in READY_RULES:
            return dataclasses.replace(READY_RULES[rule], op=key)
        if "::" in rule or "." in rule:
            source = registry.find_rule(registry.qualified(rule))
            if source is None:
                raise OpRuleError(f"there is no rule for {rule!r} to reuse for {key}",
                                  f"name an op that has one (docs/ops.md) or a ready rule: {sorted(READY_RULES)}")
            return dataclasses.replace(source, op=key, family="user", summary=f"as {source.op}: {source.summary}")
        raise OpRuleError(f"unknown rule {rule!r} for {key}",
                          f"use one of {sorted(READY_RULES)}, the name of an op whose rule to reuse "
                          "('aten::linear'), a handler function or an OpRule")
    if callable(rule):
        doc = (getattr(rule, "__doc__", None) or "").strip().splitlines()
        return OpRule(key, rule, None, family="user", summary=doc[0] if doc else "user handler")
    raise OpRuleError(f"a rule must be a string, a handler or an OpRule, got {type(rule).__name__}",
                      f"use one of {sorted(READY_RULES)}, a handler function or an OpRule")


@dataclasses.dataclass
class Registration:
    """A user rule in force; `remove()` (or leaving its `with` block) restores the rule it replaced."""

    key: str
    rule: OpRule
    previous: OpRule | None

    def remove(self) -> None:
        if registry.rule_in_force(self.key) is not self.rule:
            raise OpRuleError(f"the rule registered for {self.key} is no longer in force",
                              "remove registrations in the reverse order of making them")
        registry.set_rule(self.key, self.previous)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_op(op: Any, rule: str | ChannelRule | OpRule, *, replace: bool = False) -> Registration:
    """Declare how `op` treats channels (and softmax shifts); returns a handle, usable as a context manager.

    op: a `torch.library.custom_op`, `torch.ops.ns.name` (or one overload of it), or "ns::name".
    rule: "pass_through" | "identity" | "index_map" | "barrier" (`READY_RULES`), the name of an op whose rule
    to reuse ("aten::linear": the op must have the same argument names), a handler
    `handler(analysis, node) -> labels`, or an `OpRule`. replace: override an existing rule (a builtin one
    included) instead of refusing.
    """
    key = op_key_of(op)
    new = _rule(key, rule)
    current = registry.rule_in_force(key)
    if current is not None and not replace:
        raise OpRuleError(f"{key} already has a rule ({current.family}: {current.summary})",
                          "pass replace=True to override it, or unregister_op it first")
    registry.set_rule(key, new)
    return Registration(key, new, current)


def unregister_op(op: Any) -> None:
    """Remove the user rule of `op` (a builtin rule it replaced comes back)."""
    key = op_key_of(op)
    current = registry.rule_in_force(key)
    if current is None or current is registry.builtin_rule(key):
        raise OpRuleError(f"{key} has no rule registered by the user", "nothing to unregister")
    registry.set_rule(key, None)
