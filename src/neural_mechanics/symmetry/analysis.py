"""What the per-op rules read and write: the `Analysis` of one captured graph and its `Contribution`s.

A rule labels every activation entry with a channel slot (graph.py), unites slots that must scale together,
taints slots that cannot move, and records which parameter slices write or read each slot. This module holds
that state and the small helpers every rule uses (op names, shapes); the rules themselves are the op-rule
table (ops/, one module per op family) and rules.py runs them over a graph.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.fx import Node

from neural_mechanics.symmetry.capture import CapturedGraph
from neural_mechanics.symmetry.graph import (
    INVARIANT,
    UnionFind,
    fit,
    invariant_label,
    live,
    slots_in,
    taint,
)

if TYPE_CHECKING:
    from neural_mechanics.symmetry.ops.attention import ContractionSite, QKPair
    from neural_mechanics.symmetry.ops.rms_norm import RmsNorm
    from neural_mechanics.symmetry.ties import TieOutcome

Role = Literal["in", "out"]
Labels = Any  # Tensor | list[Tensor] | None


@dataclass(slots=True)
class Contribution:
    """Parameter slice `param[index along dim]` writes (role "in") or reads (role "out") `slot`."""

    slot: int
    param: str
    dim: int | None
    index: tuple[int, ...] | None
    role: Role
    event: str
    """Template for `Symmetry.chain`; "{idx}" is replaced by the merged indices."""
    sub: tuple[int, tuple[int, ...]] | None = None
    """Optional second restriction (dim, index): the slice is the block `param[index on dim][sub]`."""


@dataclass
class Analysis:
    """The result of running the rules over a captured graph."""

    cap: CapturedGraph
    uf: UnionFind = field(default_factory=UnionFind)
    contributions: list[Contribution] = field(default_factory=list)
    normalised: dict[int, list[str]] = field(default_factory=dict)
    """slot -> events of normalisers that absorb its scale."""
    couplings: list[tuple[int, str]] = field(default_factory=list)
    blocked: Counter = field(default_factory=Counter)
    """Why moving channels were stopped: "op (reason)" -> how many times (`meta["blocked_ops"]`)."""
    blocked_at: dict[Node, list[str]] = field(default_factory=dict)
    """node -> the `blocked` keys counted there (what `describe_graph` shows next to the op)."""
    eval_batchnorm: list[str] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)
    """parameter name -> why it cannot be in a group (frozen)."""
    tied: dict[str, int] = field(default_factory=dict)
    """parameter name -> how many times live ops use it, for parameters used more than once (ties.py)."""
    tie_uses: dict[str, dict[Node, list[Contribution]]] = field(default_factory=dict)
    """tied parameter -> use node -> the contributions of that parameter the node's rule made."""
    tie_twice: set[Node] = field(default_factory=set)
    """Nodes that use one tied parameter more than once (never joined: ties.py)."""
    ties: list[TieOutcome] = field(default_factory=list)
    """What became of each tied parameter (ties.py, `resolve_ties`)."""
    env: dict[Node, Labels] = field(default_factory=dict)
    dead: list[Node] = field(default_factory=list)
    """Ops whose value never reaches the output nor Python (an unused branch)."""
    weight_norms: dict[Node, tuple[str, str, int]] = field(default_factory=dict)
    """`_weight_norm` node -> (v name, g name, dim)."""
    scale_chains: dict[Node, Any] = field(default_factory=dict)
    """End of a parameter's reshape chain -> (parameter node, chain) for `gamma.view(...) * x`."""
    rms_norms: dict[Node, RmsNorm] = field(default_factory=dict)
    """Hand-written RMS normalisations, keyed by their normalising product (ops/rms_norm.py)."""
    contraction_sites: list[ContractionSite] = field(default_factory=list)
    """Query/key contractions whose factors are tainted only at the end (`resolve_contractions`)."""
    qk_pairs: list[QKPair] = field(default_factory=list)
    """Query/key channel pairs that form a rescale group (filled by `resolve_contractions`)."""

    # ---- parameters --------------------------------------------------------------------------
    def param_name(self, arg: Any) -> str | None:
        return self.cap.params.get(arg) if isinstance(arg, Node) else None

    def usable(self, name: str | None) -> bool:
        """Whether the parameter may be in a channel group (not frozen; a tied one is, jointly over its uses)."""
        return name is not None and name not in self.unusable

    def alone(self, name: str | None) -> bool:
        """Whether the parameter may move on its own (a translation group): usable and used by one op only."""
        return self.usable(name) and name not in self.tied

    # ---- labels ------------------------------------------------------------------------------
    def lab(self, arg: Any, ndim: int | None = None) -> Tensor:
        """Labels of an argument (scalars and non-tensors are INVARIANT), fitted to rank `ndim`."""
        if isinstance(arg, Node):
            if arg not in self.env and arg in self.cap.params:
                self.env[arg] = self.param_as_activation(arg)
            v = self.env.get(arg)
            if isinstance(v, Tensor):
                return v if ndim is None else fit(v, ndim)
        return invariant_label(0 if ndim is None else ndim)

    def param_as_activation(self, node: Node) -> Tensor:
        """A parameter entering an op as data (positional embedding, class token, x + bias): a writer.

        Slots run along its last dimension of size > 1 (all other dimensions share them, a coarser but
        sound choice); member `param[i along that dim]` scales slot i.
        """
        name = self.cap.params[node]
        shape = tuple(shape_of(node))
        if not self.usable(name):
            return invariant_label(len(shape))
        dims = [d for d, s in enumerate(shape) if s > 1]
        if not dims:
            slot = self.uf.new(1)
            self.contributions.append(
                Contribution(slot, name, None, None, "in", f"{name}: used directly as an activation")
            )
            return torch.full((1,) * len(shape), slot, dtype=torch.long)
        d = dims[-1]
        base = self.uf.new(shape[d])
        for i in range(shape[d]):
            self.contributions.append(
                Contribution(base + i, name, d, (i,), "in", f"{name}: used directly as an activation, index {{idx}}")
            )
        view = [1] * len(shape)
        view[d] = shape[d]
        return (base + torch.arange(shape[d])).view(view)

    def fresh(self, n: int, ndim: int, dim: int) -> tuple[int, Tensor]:
        """Allocate n fresh slots laid out along `dim` of a rank-`ndim` activation."""
        base = self.uf.new(n)
        view = [1] * ndim
        view[dim] = n
        return base, (base + torch.arange(n)).view(view)

    def moving(self, lab: Tensor) -> bool:
        """Whether some entry's class can still move (a live slot not joined to INVARIANT).

        Tainting is final, so a factor none of whose classes can move is a constant for every op after it
        (`gelu_new(gate) * up`: the gate's class was tainted by its pow before the product).
        """
        return any(self.uf.find(s) != INVARIANT for s in slots_in(lab))

    def taint_args(self, args: Iterable[Any]) -> bool:
        """Taint every slot that reaches one of `args` (the graph nodes among them); True if any slot was live."""
        found = False
        for arg in args:
            if isinstance(arg, Node):
                lab = self.lab(arg)
                if live(lab):
                    found = True
                    taint(self.uf, lab)
        return found

    def note_blocked(self, node: Node, key: str) -> None:
        """Count one stop of moving channels at `node` under `key` ("aten.gelu", "aten.linear (frozen ...)")."""
        self.blocked[key] += 1
        self.blocked_at.setdefault(node, []).append(key)

    def barrier(self, node: Node) -> Labels:
        """Taint every slot reaching `node`; its output does not move."""
        if self.taint_args(flat_args(node)):
            self.note_blocked(node, opname(node))
        return invariant_outputs(node)


def oriented_classes(a: Analysis, roots: set[int] | None = None,
                     root_of: list[int] | None = None) -> dict[int, list[Contribution]]:
    """Contributions by class root (INVARIANT left out), roles as seen from the class's own factor.

    A slot joined to its class *anti* (a tied parameter: symmetry/ties.py) scales by the inverse of the
    class factor, so its writers act like readers and its readers like writers: their roles are flipped.
    The orientation of a class is that of its first contribution (in graph order). roots: only these classes.
    root_of: `a.uf.roots()` when the caller already has it.
    """
    uf = a.uf
    by_root: dict[int, list[Contribution]] = defaultdict(list)
    if not uf.signed:  # no anti union: every parity is 0, roles stay as recorded; one root lookup for all slots
        if root_of is None:
            root_of = uf.roots()
        for c in a.contributions:
            r = root_of[c.slot]
            if r != INVARIANT and (roots is None or r in roots):
                by_root[r].append(c)
        return by_root
    orient: dict[int, int] = {}
    for c in a.contributions:
        r, parity = uf.find_parity(c.slot)
        if r == INVARIANT or (roots is not None and r not in roots):
            continue
        if orient.setdefault(r, parity) != parity:
            c = replace(c, role="out" if c.role == "in" else "in")
        by_root[r].append(c)
    return by_root


# ---- helpers ---------------------------------------------------------------------------------
def opname(node: Node) -> str:
    """How an op is named in reports: "aten.relu_" (its overload packet), "getitem", or the callable's name."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    packet = getattr(t, "overloadpacket", None)
    return str(packet) if packet is not None else getattr(t, "__name__", str(t))


def shape_of(node: Any) -> tuple[int, ...]:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, Tensor) else ()


def ndim_of(node: Any) -> int:
    return len(shape_of(node))


def invariant_outputs(node: Node) -> Labels:
    v = node.meta.get("val")
    if isinstance(v, Tensor):
        return invariant_label(v.ndim)
    if isinstance(v, (list, tuple)):
        return [invariant_label(x.ndim) if isinstance(x, Tensor) else None for x in v]
    return None


def flat_args(node: Node) -> list[Any]:
    """The node's positional then keyword arguments, nested lists and dicts flattened."""
    return flat_list([node.args, node.kwargs])


def flat_list(values: Any) -> list[Any]:
    """Every leaf of nested lists, tuples and dicts (dict values), in order."""
    out: list[Any] = []

    def visit(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
        else:
            out.append(a)

    visit(values)
    return out


def replay_op(node: Node, value_of: Callable[[Node, Tensor], Any], args: Sequence[Any] | None = None,
              kwargs: Mapping[str, Any] | None = None) -> Any:
    """Run `node`'s op on substitutes for the values it reads (how every engine replays an op on labels).

    A graph value x the op reads becomes value_of(x, v), v its recorded (fake) tensor, or v itself when it
    is not a tensor (a size, a list); other arguments are passed as recorded. `args` / `kwargs` replace the
    node's own (a padding value changed before the replay).
    """

    def sub(x: Any) -> Any:
        if isinstance(x, Node):
            v = x.meta.get("val")
            return value_of(x, v) if isinstance(v, Tensor) else v
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        return x

    args = node.args if args is None else args
    kwargs = node.kwargs if kwargs is None else kwargs
    return node.target(*[sub(x) for x in args], **{k: sub(v) for k, v in kwargs.items()})  # type: ignore[operator]


def zeros_like_val(_x: Node, v: Tensor) -> Tensor:
    """A `replay_op` substitute for an input that carries nothing: float64 zeros of its shape."""
    return torch.zeros(v.shape, dtype=torch.float64)


def module_of(param: str) -> str:
    return param.rpartition(".")[0] or param


def dims_text(ndim: int, skip: int) -> str:
    names = {1: ["N"], 2: ["N"], 3: ["N", "L"], 4: ["N", "H", "W"], 5: ["N", "D", "H", "W"]}.get(ndim)
    if names is None:
        names = [f"d{i}" for i in range(ndim) if i != skip]
    return "(" + ",".join(names) + ")"
