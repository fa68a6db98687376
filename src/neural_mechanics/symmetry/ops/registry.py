"""The op-rule table: one `OpRule` per operator, the single place both propagation engines look an op up.

A record says, for one operator (an ATen overload packet such as `aten::conv2d`, a user's `torch.library`
custom op, or a plain callable such as `operator.getitem`):
- `channel`: how the op moves, ties, writes, reads or normalises channel slots (rules.py runs these;
  None = a barrier: every slot reaching it is tainted, its output does not move);
- `shift`: how a per-sample shift of the logits (a shift constant along the class axis) passes through
  it, for the translation engine (translation.py; None = the shift stops here and the group is lost);
- `flags`: facts other passes need (`Flag`).

Keys are qualified packet names ("aten::relu", "mylib::my_relu"), so an op of another namespace that shares
an ATen op's name is not taken for it; Python's `operator` functions, which are not operators but appear
in graphs, are keyed by their name ("getitem"). An in-place variant ("aten::relu_") uses the rule of its
out-of-place op ("aten::relu") unless it has its own, the ATen naming convention. An op without a record
is a barrier: the engine never reads "no symmetry" into an op it does not understand.

The family modules fill the table with `@register` (one registration per op, checked: a second record
for the same op is an error); users add records through `register_op` (ops/user.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from neural_mechanics.errors import NMechError

if TYPE_CHECKING:
    from neural_mechanics.symmetry.analysis import Analysis, Labels

ChannelRule = Callable[["Analysis", Node], "Labels"]
"""handler(analysis, node) -> the node's label tensor(s); see analysis.py for what a handler may do."""


class OpRuleError(NMechError):
    """An op rule cannot be registered, found or applied as asked (unknown op, unknown rule, failing handler)."""


class Shift(Enum):
    """How a per-sample shift s of an activation, constant along the class axis, passes an op.

    The translation engine follows a writer's output z (shifted by alpha x_j, constant along the class
    axis) to a softmax; every op on the way must keep "a shift constant along one axis" constant along
    some axis of its output, and only these kinds do (`SHIFT_MEANING` says how each does).
    """

    SOFTMAX = "softmax sink"
    SAME = "carried"
    SUM = "sum"
    SCALAR_FACTOR = "scalar factor"
    LINEAR_REDUCE = "linear reduction"
    LINEAR_POOL = "linear pool"
    INDEX_MAP = "index map"
    ATTENTION_KEY = "attention key"
    SCORES = "attention scores"


SHIFT_MEANING: dict[Shift, str] = {
    Shift.SOFTMAX: "softmax / log_softmax / cross-entropy over dim d: softmax(z + s 1) = softmax(z); the group "
                   "holds when the shift is constant along d",
    Shift.SAME: "out = +-in entrywise (a copy, a float cast, a negation, an inactive dropout): the shift is "
                "carried on the same axis",
    Shift.SUM: "x + y, x - y: each summand's shift is added to the output (axes aligned from the right)",
    Shift.SCALAR_FACTOR: "x * c, x / c with c not a graph value: the shift is scaled by a constant",
    Shift.LINEAR_REDUCE: "mean / sum over axes other than the class axis: still constant along it",
    Shift.LINEAR_POOL: "average pooling and linear interpolation over the trailing k spatial axes, the class "
                       "axis not among them: still constant along it",
    Shift.INDEX_MAP: "the op only moves entries (view, permute, cat, pad, split...): replayed on row labels to "
                     "see which output axis still carries one shift per fibre",
    Shift.ATTENTION_KEY: "scaled_dot_product_attention: a shift delta of the keys, constant over the keys, adds "
                         "q . delta to every score of a query, which the softmax over the keys ignores",
    Shift.SCORES: "q @ k^T: a shift of the right factor, constant over its last axis, shifts every score of a "
                  "query equally (when the scores reach a softmax over that axis)",
}
"""What each shift kind means (docs/ops.md is written from this)."""


@dataclass(frozen=True)
class ShiftRule:
    """A `Shift` kind, applicable only where `when(node)` holds (None: always)."""

    kind: Shift
    when: Callable[[Node], bool] | None = None
    condition: str = ""
    """The condition in words (for docs/ops.md), e.g. "p == 0 or eval"."""

    def at(self, node: Node) -> Shift | None:
        return self.kind if self.when is None or self.when(node) else None


class Flag(Enum):
    """Facts about an op that passes other than the two engines' rules need (`FLAG_MEANING`)."""

    LEAK = "leak"
    REARRANGE = "rearrange"
    SHIFT_SOURCE = "shift source"


FLAG_MEANING: dict[Flag, str] = {
    Flag.LEAK: "the value leaves the graph into Python (`.item()`, `if t:`), so it counts as an output",
    Flag.REARRANGE: "a single-input rearrangement a parameter may pass through on its way to a layer-scale "
                    "product (`gamma.view(-1, 1, 1) * x`)",
    Flag.SHIFT_SOURCE: "an ungrouped Linear/Conv: W[:, j] x_j and the bias add one value to every output channel, "
                       "a translation group when the output reaches a softmax",
}
"""What each flag means (docs/ops.md is written from this)."""


@dataclass(frozen=True)
class OpRule:
    """Everything the engines know about one operator."""

    op: str
    """Registry key: the qualified packet name ("aten::relu") or a callable's name ("getitem")."""
    channel: ChannelRule | None
    shift: ShiftRule | None = None
    flags: frozenset[Flag] = field(default_factory=frozenset)
    family: str = "user"
    """The module that registered it ("elementwise", "linear", ..., "user")."""
    summary: str = ""
    """One line on the channel rule (docs/ops.md)."""

    def shift_at(self, node: Node) -> Shift | None:
        """The shift kind that applies at `node` (None if the op stops a shift there)."""
        return None if self.shift is None else self.shift.at(node)


_BUILTIN: dict[str, OpRule] = {}
"""Rules registered by the family modules (never changed after import)."""
_TABLE: dict[str, OpRule] = {}
"""The rules in force: the builtins, plus or replaced by the users' rules."""
_CACHE: dict[Any, OpRule | None] = {}
"""node.target -> its rule, emptied whenever the table changes (a lookup per node must stay cheap)."""


def qualified(name: str) -> str:
    """"relu" -> "aten::relu"; "mylib.my_relu" -> "mylib::my_relu"; "mylib::f" and "getitem" stay."""
    if "::" in name:
        return name
    ns, dot, rest = name.partition(".")
    if dot:
        return f"{ns}::{rest}"
    return name if name in _PLAIN else f"aten::{name}"


_PLAIN = {"getitem"}
"""Keys of callables that are not operators (their rules are registered by name)."""


def op_key(target: Any) -> str | None:
    """The registry key of a node target, an OpOverload(Packet), a custom op or a callable (None if none)."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    custom = getattr(target, "_qualname", None)  # torch.library.custom_op's CustomOpDef
    if isinstance(custom, str):
        return custom
    if getattr(target, "__module__", None) in ("operator", "_operator"):  # operator.getitem
        return str(target.__name__)
    return None


def find_rule(key: str | None) -> OpRule | None:
    """The rule in force for a registry key (an in-place key falls back on its op)."""
    if key is None:
        return None
    rule = _TABLE.get(key)
    if rule is None and key.endswith("_") and not key.endswith("__"):
        rule = _TABLE.get(key[:-1])  # in-place variant: the out-of-place op's rule
    return rule


def rule_for(target: Any) -> OpRule | None:
    """The rule in force for a node target (an in-place variant falls back on its op); None: a barrier."""
    try:
        return _CACHE[target]
    except KeyError:
        rule = _CACHE[target] = find_rule(op_key(target))
        return rule
    except TypeError:  # an unhashable target
        return find_rule(op_key(target))


def rule_of(node: Node) -> OpRule | None:
    """The rule of a call_function node (None for placeholders, outputs and ops without a rule)."""
    return rule_for(node.target) if node.op == "call_function" else None


def canonical(node: Node) -> str | None:
    """The key of the rule that applies at `node` ("aten::mul" for `aten.mul_`), None without a rule."""
    rule = rule_of(node)
    return None if rule is None else rule.op


def shift_kind(node: Node) -> Shift | None:
    """The shift kind that applies at a node (None: it stops a per-sample shift)."""
    rule = rule_of(node)
    return None if rule is None else rule.shift_at(node)


def rules(*, builtin_only: bool = False) -> list[OpRule]:
    """Every rule in force (or only the package's own), sorted by key."""
    table = _BUILTIN if builtin_only else _TABLE
    return [table[k] for k in sorted(table)]


def builtin_rule(key: str) -> OpRule | None:
    """The package's own rule for exactly this key (None if it has none)."""
    return _BUILTIN.get(key)


def rule_in_force(key: str) -> OpRule | None:
    """The rule in force for exactly this key (no in-place fallback)."""
    return _TABLE.get(key)


def op_exists(key: str) -> bool:
    """Whether torch defines the operator "namespace::name"."""
    ns, _, name = key.partition("::")
    try:
        getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register(
    *names: str,
    shift: Shift | ShiftRule | None = None,
    flags: Iterable[Flag] = (),
    family: str | None = None,
    summary: str | None = None,
) -> Callable[[ChannelRule], ChannelRule]:
    """Decorator: the function is the channel rule of every op in `names` (ATen names may omit "aten::").

    `family` defaults to the defining module's name, `summary` to the first line of its docstring.
    Stack several `@register` on one handler when its ops differ in their shift rule or flags.
    """

    def deco(fn: ChannelRule) -> ChannelRule:
        fam = family or fn.__module__.rpartition(".")[2]
        text = summary if summary is not None else (fn.__doc__ or "").strip().splitlines()[0]
        define(*names, channel=fn, shift=shift, flags=flags, family=fam, summary=text)
        return fn

    return deco


def define(
    *names: str,
    channel: ChannelRule | None,
    shift: Shift | ShiftRule | None = None,
    flags: Iterable[Flag] = (),
    family: str,
    summary: str,
) -> None:
    """Add one builtin record per op in `names` (for ops without a channel handler: sinks, leaks)."""
    rule_shift = ShiftRule(shift) if isinstance(shift, Shift) else shift
    for name in names:
        key = qualified(name)
        if key in _BUILTIN:
            raise RuntimeError(f"two builtin rules for {key}: {_BUILTIN[key].family} and {family}")
        if key not in _PLAIN and not op_exists(key):
            raise RuntimeError(f"builtin rule for {key}, which this torch does not define")
        _BUILTIN[key] = _TABLE[key] = OpRule(key, channel, rule_shift, frozenset(flags), family, summary)
    _CACHE.clear()


def set_rule(key: str, rule: OpRule | None) -> None:
    """Put `rule` in force for `key` (None: fall back on the builtin, or no rule)."""
    if rule is not None:
        _TABLE[key] = rule
    elif key in _BUILTIN:
        _TABLE[key] = _BUILTIN[key]
    else:
        _TABLE.pop(key, None)
    _CACHE.clear()
