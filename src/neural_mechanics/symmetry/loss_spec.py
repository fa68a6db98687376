"""`LossSpec`: the loss a symmetry is stated for, and what each of the three entry points reads of it.

find_symmetries traces `LossSpec.captured()` after the model; certify compares the output tensors the loss reads
(`LossSpec.reads`) and the loss with its targets bound (`LossSpec.bind`); check_constraints differentiates that bound
loss. The conventions it implements (the softmax stand-in, where the logits are, the class axis, token losses,
targets) are stated once, in the docstring of symmetry/loss.py, next to `as_loss_spec`, which turns the user's `loss=`
argument into a LossSpec; where output tensors are found is symmetry/outputs.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from neural_mechanics.errors import LossSpecError
from neural_mechanics.symmetry.outputs import (
    Leaf,
    first_tensor,
    locate_logits,
    output_leaves,
    output_tensors,
    read_leaves,
)

LossKind = Literal["softmax", "plain", "custom"]
LOSS_KINDS: tuple[LossKind, ...] = ("softmax", "plain", "custom")
IGNORE_INDEX = -100
"""Targets equal to this are not scored (`F.cross_entropy`'s default; the masked-LM and padding convention)."""

__all__ = ["IGNORE_INDEX", "LOSS_KINDS", "LossKind", "LossSpec", "class_axis", "softmax_loss"]


def class_axis(ndim: int, class_dim: int | None = None, name: str = "cross_entropy") -> int:
    """The non-negative class axis of logits of rank `ndim`: the class-axis rule of symmetry/loss.py's docstring.

    class_dim None: 0 for 1-D (and 0-d) logits, ndim - 1 for 3-D logits (B, T, V), 1 otherwise. A given
    class_dim must lie in range (1-D logits always use axis 0).
    """
    if ndim <= 1:
        return 0
    if class_dim is None:
        return ndim - 1 if ndim == 3 else 1
    if not -ndim <= class_dim < ndim:
        raise LossSpecError(f"loss {name!r}: class_dim {class_dim} is out of range for logits of rank {ndim}",
                            "pass LossSpec.cross_entropy(class_dim=...) within range")
    return class_dim % ndim


def softmax_loss(out: Any, class_dim: int | None = None) -> Tensor:
    """The captured stand-in for cross-entropy: sum(log_softmax(logits, dim=class_axis(...))).

    Cross-entropy with any targets is a function of log_softmax over the class axis, so its symmetries are
    those of this graph. A 0-d output is traced as it always was (log_softmax over its one axis, a constant):
    the detector then finds only what holds for the output itself; certify and check_constraints refuse it.
    """
    logits = first_tensor(out)
    return F.log_softmax(logits, dim=class_axis(logits.ndim, class_dim)).sum()


def _floating_leaves(out: Any) -> list[Leaf]:
    return [(p, t) for p, t in output_leaves(out) if t.is_floating_point()]


@dataclass(frozen=True)
class LossSpec:
    """The loss a symmetry is stated for, as all three entry points read it.

    kind "softmax": cross-entropy of the logits over the class axis (`class_dim`, None: the rule of
    `class_axis`), scoring the logits at position t against the target at t + `target_offset` along the
    sequence axis (the axis before the class axis; 0: no offset, 1: next-token prediction); "plain": mean
    squared error of every floating output tensor; "custom": `fn(outputs)` or, with `takes_targets`,
    `fn(outputs, targets)`. `name` is what reports and `SymmetrySet.meta["loss"]` show. Build one with the
    class methods, or let `as_loss_spec` convert a string or a callable.
    """

    kind: LossKind
    name: str
    fn: Callable[..., Tensor] | None = None
    takes_targets: bool = False
    class_dim: int | None = None
    target_offset: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise LossSpecError(f"unknown LossSpec kind {self.kind!r}", f"use one of {LOSS_KINDS}")
        if (self.kind == "custom") != (self.fn is not None) or (self.fn is not None and not callable(self.fn)):
            what = "needs a callable fn" if self.kind == "custom" else "takes no fn"
            raise LossSpecError(f"a {self.kind!r} LossSpec {what}",
                                "use LossSpec.of_outputs(fn) or LossSpec.of_outputs_and_targets(fn) for your own loss")
        if self.class_dim is not None and not isinstance(self.class_dim, int):
            raise LossSpecError(f"class_dim must be an int or None, got {type(self.class_dim).__name__}",
                                "e.g. class_dim=-1")
        if not isinstance(self.target_offset, int) or self.target_offset < 0 or (
                self.target_offset and self.kind != "softmax"):
            raise LossSpecError(f"target_offset must be an int >= 0 of a softmax loss, got {self.target_offset!r}",
                                "use LossSpec.next_token(shift=True) for targets aligned with the inputs")

    # -- constructors ------------------------------------------------------------------------------------------

    @classmethod
    def cross_entropy(cls, *, class_dim: int | None = None, name: str = "cross_entropy") -> LossSpec:
        """Softmax cross-entropy over axis `class_dim` of the logits (None: the `class_axis` rule; 1: (N, C, ...);
        -1: token logits (B, T, V))."""
        return cls("softmax", name, class_dim=class_dim)

    @classmethod
    def next_token(cls, *, shift: bool = False, name: str | None = None) -> LossSpec:
        """Next-token loss over token logits (B, T, V) (softmax over V). shift=False ("next_token"): targets (B, T)
        are the next token ids, position t scored against target t; shift=True ("causal_lm"): targets aligned with
        the inputs (labels = input_ids), position t scored against target t + 1."""
        if shift:
            return cls("softmax", name or "causal_lm", class_dim=-1, target_offset=1)
        return cls("softmax", name or "next_token", class_dim=-1)

    @classmethod
    def masked_token(cls, *, name: str = "masked_token") -> LossSpec:
        """Masked LM loss: logits (B, T, V) against targets (B, T), -100 where no token is predicted."""
        return cls("softmax", name, class_dim=-1)

    @classmethod
    def plain(cls, name: str = "mse") -> LossSpec:
        """No softmax: the outputs themselves must be unchanged (mean squared error against targets)."""
        return cls("plain", name)

    @classmethod
    def of_outputs(cls, fn: Callable[[Any], Tensor], name: str | None = None) -> LossSpec:
        """Your own loss(outputs) -> scalar, captured with the model by find_symmetries."""
        return cls("custom", name or callable_name(fn), fn=fn, takes_targets=False)

    @classmethod
    def of_outputs_and_targets(cls, fn: Callable[[Any, Any], Tensor], name: str | None = None) -> LossSpec:
        """Your own loss(outputs, targets) -> scalar (certify and check_constraints; find_symmetries needs targets
        bound in: pass LossSpec.of_outputs(lambda out: fn(out, y)))."""
        return cls("custom", name or callable_name(fn), fn=fn, takes_targets=True)

    # -- what each entry point reads ---------------------------------------------------------------------------

    def logits(self, outputs: Any) -> Tensor:
        """The tensor a softmax loss reads (`outputs.locate_logits`), before any position is sliced off."""
        return first_tensor(outputs)

    def axis(self, logits: Tensor) -> int:
        """The class axis this loss takes the softmax over, for these logits (`class_axis`)."""
        return class_axis(logits.ndim, self.class_dim, self.name)

    def _scored_axis(self, logits: Tensor) -> int:
        """`axis` for logits a loss scores (certify, check_constraints): 0-d logits are refused."""
        if logits.ndim == 0:
            raise LossSpecError(f"{self.name} needs outputs of shape (N, C, ...), got ()",
                                "pass loss='mse' or a callable loss")
        return self.axis(logits)

    def _seq_axis(self, logits: Tensor) -> int:
        seq = self.axis(logits) - 1
        if logits.ndim < 2 or seq < 0 or logits.shape[seq] <= self.target_offset:
            raise LossSpecError(
                f"loss {self.name!r} scores position t against the target at t + {self.target_offset}, which needs "
                f"logits (B, T, V) with T > {self.target_offset}; got shape {tuple(logits.shape)}",
                "feed sequences of at least two tokens, or use loss='next_token' with targets already shifted")
        return seq

    def scored_leaf(self, outputs: Any) -> Leaf:
        """The logits the softmax loss scores, with their path: for next-token, all positions but the last."""
        path, z = locate_logits(outputs)
        if self.target_offset:
            seq = self._seq_axis(z)
            z = z.narrow(seq, 0, z.shape[seq] - self.target_offset)
            path += "[" + ":, " * seq + f":-{self.target_offset}]"
        return path, z

    def _scored_shape(self, outputs: Any) -> tuple[str, tuple[int, ...]]:
        """`scored_leaf`'s path and shape, computed from shapes alone (no op is run: safe inside a trace)."""
        path, z = locate_logits(outputs)
        shape = [int(n) for n in z.shape]
        if self.target_offset:
            seq = self._seq_axis(z)
            shape[seq] -= self.target_offset
            path += "[" + ":, " * seq + f":-{self.target_offset}]"
        return path, tuple(shape)

    def captured(self) -> Callable[[Any], Tensor] | None:
        """What find_symmetries traces after the model: outputs -> scalar, or None for the outputs themselves."""
        if self.kind == "plain":
            return None
        if self.kind == "softmax":
            return self._stand_in
        if self.takes_targets:
            raise LossSpecError(
                f"loss {self.name!r} takes (outputs, targets); find_symmetries captures a loss of the outputs alone",
                "pass loss='cross_entropy', or bind the targets: loss=lambda out: your_loss(out, y)",
            )
        return self.fn

    def _stand_in(self, outputs: Any) -> Tensor:
        """sum(log_softmax(z, class axis)) over the scored logits z (the stand-in of symmetry/loss.py's docstring)."""
        z = self.scored_leaf(outputs)[1]
        return F.log_softmax(z, dim=self.axis(z)).sum()

    def reads(self, outputs: Any, loss: Callable[[Any], Tensor] | None = None) -> list[Leaf]:
        """The output tensors the loss reads, with their paths (what certify compares).

        softmax: the scored logits; plain: every floating output tensor; custom: the floating output tensors
        `loss` (the bound loss, default `fn` for a loss of the outputs alone) depends on (`read_leaves`).
        """
        if self.kind == "softmax":
            return [self.scored_leaf(outputs)]
        if self.kind == "plain":
            return _floating_leaves(outputs)
        if loss is None and not self.takes_targets:
            loss = self.fn
        return read_leaves(outputs, loss) if loss is not None else _floating_leaves(outputs)

    def observed(self, outputs: Any) -> list[Tensor]:
        """The output tensors certify compares (`reads`; for a custom loss of targets: every floating output)."""
        return [t for _, t in self.reads(outputs)]

    def describe(self, outputs: Any) -> str:
        """The loss in words, for reports: its name and, for a softmax loss, the axis and positions it scores
        (from shapes alone: capture calls it inside the trace)."""
        if self.kind != "softmax":
            return self.name
        path, shape = self._scored_shape(outputs)
        text = f"{self.name}: softmax over axis {class_axis(len(shape), self.class_dim, self.name)} of {path} {shape}"
        if self.target_offset:
            text += f", position t scored against target t + {self.target_offset}"
        return text

    def bind(self, targets: Any = None, *, like: Any = None, generator: torch.Generator | None = None
             ) -> Callable[[Any], Tensor]:
        """outputs -> scalar loss with the targets fixed (certify compares it, check_constraints differentiates it).

        targets=None: seeded random targets shaped after `like` (an output of the model) drawn from `generator`
        (class indices over the class axis at every position for a softmax loss, standard normal for mse); a
        custom loss(outputs, targets) needs real targets. With `like`, given targets are moved to its device
        (and, for mse or a custom loss, floating targets to its dtype).
        """
        if self.kind == "softmax":
            return self._bind_softmax(targets, like, generator)
        if self.kind == "plain":
            return self._bind_plain(targets, like, generator)
        fn = self.fn
        assert fn is not None  # __post_init__
        if not self.takes_targets:
            return fn
        if targets is None:
            raise LossSpecError(f"loss {self.name!r} takes (outputs, targets) but no targets were given",
                                "pass targets=... to certify, or the batch as (inputs, targets) to check_constraints")
        like_tensors = output_tensors(like) if like is not None else []
        t = _cast_like(targets, like_tensors[0] if like_tensors else None)
        return lambda out: fn(out, t)

    def _bind_softmax(self, targets: Any, like: Any, generator: torch.Generator | None) -> Callable[[Any], Tensor]:
        if like is not None:
            z0 = self.logits(like)
            axis = self._scored_axis(z0)
            if self.target_offset:
                self._seq_axis(z0)
            if targets is None:
                if generator is None:
                    raise LossSpecError("random targets need a generator", "pass generator=torch.Generator()")
                shape = (*z0.shape[:axis], *z0.shape[axis + 1 :])
                targets = torch.randint(0, z0.shape[axis], shape, generator=generator).to(z0.device)
            targets = targets.to(z0.device)
        elif targets is None:
            raise LossSpecError(f"loss {self.name!r} needs targets", "pass the batch as (inputs, targets)")
        t: Tensor = targets

        def cross_entropy(out: Any) -> Tensor:
            z = self.logits(out)
            axis, y = self._scored_axis(z), t
            if self.target_offset:
                seq = self._seq_axis(z)
                want = (*z.shape[:axis], *z.shape[axis + 1 :])
                if tuple(y.shape) != want:
                    raise LossSpecError(
                        f"loss {self.name!r} takes targets {want} aligned with the logits {tuple(z.shape)} (position "
                        f"t is scored against target t + {self.target_offset}), got {tuple(y.shape)}",
                        "pass the token ids themselves (the labels before shifting), e.g. targets = input_ids")
                z = z.narrow(seq, 0, z.shape[seq] - self.target_offset)
                y = y.narrow(seq, self.target_offset, y.shape[seq] - self.target_offset)
            return F.cross_entropy(z if z.ndim == 1 or axis == 1 else z.movedim(axis, 1), y,
                                   ignore_index=IGNORE_INDEX)

        return cross_entropy

    def _bind_plain(self, targets: Any, like: Any, generator: torch.Generator | None) -> Callable[[Any], Tensor]:
        name = self.name
        if like is not None:
            outs = [x for _, x in _floating_leaves(like)]
            if not outs:
                raise LossSpecError(f"loss={name!r} needs the model to return floating tensors, got "
                                    f"{type(like).__name__} without any", "pass loss=callable(outputs) -> scalar")
            if targets is None:
                if generator is None:
                    raise LossSpecError("random targets need a generator", "pass generator=torch.Generator()")
                targets = [torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device) for o in outs]
            ts = _target_list(targets, len(outs), name)
            targets = [y.to(device=o.device, dtype=o.dtype) for y, o in zip(ts, outs, strict=True)]
        elif targets is None:
            raise LossSpecError(f"loss {name!r} needs targets", "pass the batch as (inputs, targets)")
        fixed = targets

        def mse(out: Any) -> Tensor:
            outs = [x for _, x in _floating_leaves(out)]
            ts = _target_list(fixed, len(outs), name)
            return sum((F.mse_loss(o, y) for o, y in zip(outs[1:], ts[1:], strict=True)), F.mse_loss(outs[0], ts[0]))

        return mse


def _target_list(targets: Any, n: int, name: str) -> list[Tensor]:
    """mse targets as one tensor per floating output tensor (a tensor for a single output, a sequence otherwise)."""
    ts = [targets] if isinstance(targets, Tensor) else list(targets) if isinstance(targets, Sequence) else None
    if ts is None or len(ts) != n or not all(isinstance(y, Tensor) for y in ts):
        got = type(targets).__name__ if ts is None else f"{len(ts)} target(s)"
        raise LossSpecError(f"loss={name!r} compares {n} output tensor(s) with their targets, got {got}",
                            "pass one target tensor per floating output tensor (a list, in output order), or "
                            "loss=callable(outputs, targets)")
    return ts


def callable_name(fn: Callable[..., Any]) -> str:
    """The name a custom loss is shown under: the callable's `__name__`, else its type's name."""
    return getattr(fn, "__name__", type(fn).__name__)


def _cast_like(targets: Any, like: Tensor | None) -> Any:
    """Targets moved to `like`'s device, floating ones cast to its dtype (tensors only; other values as they are)."""
    if like is None or not isinstance(targets, Tensor):
        return targets
    targets = targets.to(like.device)
    return targets.to(like.dtype) if targets.is_floating_point() else targets
