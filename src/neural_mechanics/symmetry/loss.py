"""One loss specification shared by `find_symmetries`, `certify` and `check_constraints`.

A symmetry is a statement about the model *and* the loss, L(psi(theta, alpha)) = L(theta), so the three
entry points must mean the same loss by the same argument. Each accepts a `LossLike` and converts it with
one function, `as_loss_spec`, into a `LossSpec`:

| argument                         | kind    | find_symmetries captures   | certify / check_constraints | compares     |
|----------------------------------|---------|----------------------------|-----------------------------|--------------|
| "cross_entropy", "softmax"       | softmax | sum(log_softmax(z, axis))  | cross_entropy(z, targets)   | the logits z |
| "mse", "none", None              | plain   | the outputs themselves     | mse(outputs, targets)       | the output   |
| loss(outputs) -> scalar          | custom  | loss(outputs)              | loss(outputs)               | every output |
| loss(outputs, targets) -> scalar | custom  | refused (needs targets)    | loss(outputs, targets)      | every output |
| a LossSpec                       | its own |                            |                             |              |

* The softmax stand-in: cross-entropy with any targets is a function of log_softmax over the class axis,
  so the symmetries that hold for every target are those of sum(log_softmax(z)); that graph is what the
  detector reads (docs/theory.md section 1, translation).
* The logits z of an output (`first_tensor`): the tensor itself, a dict's (or Hugging Face output's)
  "logits", an object's `.logits`, or the first tensor of a tuple. Only what the loss reads is compared
  when certifying, so extra outputs (an auxiliary head, an encoder state) do not fail real groups.
* The class axis is `class_dim` (default 1, the `F.cross_entropy` convention; dim 0 for 1-D logits).
  Token-level logits (B, T, V) need `LossSpec.cross_entropy(class_dim=-1)`: the softmax runs over the
  vocabulary, and cross_entropy compares (B, T) targets.
* Targets: certify uses the given ones or seeded random ones (class indices over the class axis;
  standard normal for mse); check_constraints takes them from its (inputs, targets) batch.
* A plain callable's form is read from its signature: two required positional parameters ->
  loss(outputs, targets), a single positional parameter -> loss(outputs). A callable that accepts either
  (`f(out, y=None)`, `*args`, no signature) keeps each entry point's historical reading: loss(outputs)
  for find_symmetries and certify, loss(outputs, targets) for check_constraints. Say it explicitly with
  `LossSpec.of_outputs(fn)` / `LossSpec.of_outputs_and_targets(fn)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from neural_mechanics.errors import LossSpecError

LossKind = Literal["softmax", "plain", "custom"]
LOSS_KINDS: tuple[LossKind, ...] = ("softmax", "plain", "custom")

__all__ = [
    "NAMED_LOSSES",
    "LossLike",
    "LossSpec",
    "as_loss_spec",
    "first_tensor",
    "output_tensors",
    "softmax_loss",
]


def first_tensor(out: Any) -> Tensor:
    """The logits of a model output: the tensor itself, the first tensor of a tuple, or a dict's 'logits'."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        if "logits" in out and isinstance(out["logits"], Tensor):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, Tensor):
                return o
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        return out.logits
    raise LossSpecError(
        f"the model returned {type(out).__name__}, in which no logits tensor was found",
        "return a tensor (or a tuple whose first tensor is the logits), or pass loss=callable(outputs)",
    )


def output_tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model output (a tensor, or nested tuples/lists/dicts of them), in pytree order."""
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def softmax_loss(out: Any, class_dim: int = 1) -> Tensor:
    """The captured stand-in for cross-entropy: sum(log_softmax(logits, dim=class_dim)) (dim 0 for 1-D logits).

    Cross-entropy with any targets is a function of log_softmax over the class dimension (dim 1 by default,
    the `F.cross_entropy` convention), so its symmetries are those of this graph.
    """
    logits = first_tensor(out)
    # a 0-d output is traced as it always was (log_softmax over dim 0, a constant): the detector then finds only
    # what holds for the output itself; certify and check_constraints refuse it (`_class_axis`)
    return F.log_softmax(logits, dim=_class_axis(logits, class_dim, "cross_entropy", scalar_ok=True)).sum()


def _class_axis(logits: Tensor, class_dim: int, name: str, scalar_ok: bool = False) -> int:
    """The non-negative class axis of `logits`: class_dim (0 for 1-D logits)."""
    if logits.ndim == 0 and not scalar_ok:
        raise LossSpecError(f"{name} needs outputs of shape (N, C, ...), got ()", "pass loss='mse' or a callable loss")
    if logits.ndim <= 1:
        return 0
    if not -logits.ndim <= class_dim < logits.ndim:
        raise LossSpecError(f"loss {name!r}: class_dim {class_dim} is out of range for logits of shape "
                            f"{tuple(logits.shape)}", "pass LossSpec.cross_entropy(class_dim=...) within range")
    return class_dim % logits.ndim


def _single_tensor(out: Any, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise LossSpecError(f"loss={name!r} needs the model to return one tensor, got {type(out).__name__}",
                            "pass loss=callable(outputs) -> scalar tensor")
    return out


@dataclass(frozen=True)
class LossSpec:
    """The loss a symmetry is stated for, as all three entry points read it.

    kind "softmax": cross-entropy of the logits over axis `class_dim`; "plain": mean squared error of the
    (single) output; "custom": `fn(outputs)` or, with `takes_targets`, `fn(outputs, targets)`.
    `name` is what reports and `SymmetrySet.meta["loss"]` show. Build one with the class methods, or let
    `as_loss_spec` convert a string or a callable.
    """

    kind: LossKind
    name: str
    fn: Callable[..., Tensor] | None = None
    takes_targets: bool = False
    class_dim: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise LossSpecError(f"unknown LossSpec kind {self.kind!r}", f"use one of {LOSS_KINDS}")
        if (self.kind == "custom") != (self.fn is not None) or (self.fn is not None and not callable(self.fn)):
            what = "needs a callable fn" if self.kind == "custom" else "takes no fn"
            raise LossSpecError(f"a {self.kind!r} LossSpec {what}",
                                "use LossSpec.of_outputs(fn) or LossSpec.of_outputs_and_targets(fn) for your own loss")
        if not isinstance(self.class_dim, int):
            raise LossSpecError(f"class_dim must be an int, got {type(self.class_dim).__name__}", "e.g. class_dim=-1")

    # -- constructors ------------------------------------------------------------------------------------------

    @classmethod
    def cross_entropy(cls, *, class_dim: int = 1, name: str = "cross_entropy") -> LossSpec:
        """Softmax cross-entropy over axis `class_dim` of the logits (1: (N, C, ...); -1: token logits (B, T, V))."""
        return cls("softmax", name, class_dim=class_dim)

    @classmethod
    def plain(cls, name: str = "mse") -> LossSpec:
        """No softmax: the outputs themselves must be unchanged (mean squared error against targets)."""
        return cls("plain", name)

    @classmethod
    def of_outputs(cls, fn: Callable[[Any], Tensor], name: str | None = None) -> LossSpec:
        """Your own loss(outputs) -> scalar, captured with the model by find_symmetries."""
        return cls("custom", name or _callable_name(fn), fn=fn, takes_targets=False)

    @classmethod
    def of_outputs_and_targets(cls, fn: Callable[[Any, Any], Tensor], name: str | None = None) -> LossSpec:
        """Your own loss(outputs, targets) -> scalar (certify and check_constraints; find_symmetries needs targets
        bound in: pass LossSpec.of_outputs(lambda out: fn(out, y)))."""
        return cls("custom", name or _callable_name(fn), fn=fn, takes_targets=True)

    # -- what each entry point reads ---------------------------------------------------------------------------

    def logits(self, outputs: Any) -> Tensor:
        """The tensor a softmax loss reads (`first_tensor`)."""
        return first_tensor(outputs)

    def captured(self) -> Callable[[Any], Tensor] | None:
        """What find_symmetries traces after the model: outputs -> scalar, or None for the outputs themselves."""
        if self.kind == "plain":
            return None
        if self.kind == "softmax":
            class_dim = self.class_dim
            return lambda out: softmax_loss(out, class_dim)
        if self.takes_targets:
            raise LossSpecError(
                f"loss {self.name!r} takes (outputs, targets); find_symmetries captures a loss of the outputs alone",
                "pass loss='cross_entropy', or bind the targets: loss=lambda out: your_loss(out, y)",
            )
        return self.fn

    def observed(self, outputs: Any) -> list[Tensor]:
        """The output tensors the loss reads, which certify compares: the logits for a softmax loss, every
        output tensor otherwise."""
        if self.kind == "softmax":
            return [self.logits(outputs)]
        return output_tensors(outputs)

    def bind(self, targets: Any = None, *, like: Any = None, generator: torch.Generator | None = None
             ) -> Callable[[Any], Tensor]:
        """outputs -> scalar loss with the targets fixed (certify compares it, check_constraints differentiates it).

        targets=None: seeded random targets shaped after `like` (an output of the model) drawn from `generator`
        (class indices over the class axis for a softmax loss, standard normal for mse); a custom
        loss(outputs, targets) needs real targets. With `like`, given targets are moved to its device
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
            axis = _class_axis(z0, self.class_dim, self.name)
            if targets is None:
                if generator is None:
                    raise LossSpecError("random targets need a generator", "pass generator=torch.Generator()")
                shape = (*z0.shape[:axis], *z0.shape[axis + 1 :])
                targets = torch.randint(0, z0.shape[axis], shape, generator=generator).to(z0.device)
            targets = targets.to(z0.device)
        elif targets is None:
            raise LossSpecError(f"loss {self.name!r} needs targets", "pass the batch as (inputs, targets)")
        t, class_dim, name = targets, self.class_dim, self.name

        def cross_entropy(out: Any) -> Tensor:
            z = self.logits(out)
            axis = _class_axis(z, class_dim, name)
            return F.cross_entropy(z if z.ndim == 1 or axis == 1 else z.movedim(axis, 1), t)

        return cross_entropy

    def _bind_plain(self, targets: Any, like: Any, generator: torch.Generator | None) -> Callable[[Any], Tensor]:
        name = self.name
        if like is not None:
            out0 = _single_tensor(like, name)
            if targets is None:
                if generator is None:
                    raise LossSpecError("random targets need a generator", "pass generator=torch.Generator()")
                targets = torch.randn(out0.shape, generator=generator, dtype=out0.dtype).to(out0.device)
            targets = targets.to(device=out0.device, dtype=out0.dtype)
        elif targets is None:
            raise LossSpecError(f"loss {name!r} needs targets", "pass the batch as (inputs, targets)")
        t = targets
        return lambda out: F.mse_loss(_single_tensor(out, name), t)


LossLike = str | Callable[..., Any] | LossSpec | None
"""What the three entry points accept as their loss argument (see the module docstring)."""

NAMED_LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec.cross_entropy(),
    "softmax": LossSpec.cross_entropy(name="softmax"),
    "mse": LossSpec.plain("mse"),
    "none": LossSpec.plain("none"),
}
"""The losses a string names (lower-case). Token-level variants (next-token, masked-token cross-entropy) are
added here as LossSpecs when they exist."""


def as_loss_spec(loss: LossLike, *, targets_by_default: bool = False) -> LossSpec:
    """The one conversion from a loss argument to a `LossSpec`.

    A LossSpec is returned as it is; None is "none" (no loss: the outputs themselves); a string names an
    entry of NAMED_LOSSES (case-insensitive); a callable is a custom loss whose form (loss(outputs) or
    loss(outputs, targets)) is read from its signature, `targets_by_default` deciding when the signature
    allows both (see the module docstring). Anything else raises `LossSpecError`.
    """
    if isinstance(loss, LossSpec):
        return loss
    if loss is None:
        return NAMED_LOSSES["none"]
    if isinstance(loss, str):
        spec = NAMED_LOSSES.get(loss.lower())
        if spec is None:
            raise LossSpecError(
                f"unknown loss {loss!r}",
                f"use one of {tuple(NAMED_LOSSES)}, None, a callable loss(outputs) -> scalar, or a LossSpec",
            )
        return spec
    if callable(loss):
        return LossSpec("custom", _callable_name(loss), fn=loss,
                        takes_targets=_takes_targets(loss, default=targets_by_default))
    raise LossSpecError(f"loss must be a string, None, a callable or a LossSpec, got {type(loss).__name__}",
                        "pass loss='cross_entropy', loss='mse', a callable loss(outputs) -> scalar, or a LossSpec")


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _takes_targets(fn: Callable[..., Any], default: bool) -> bool:
    """Whether a callable loss is loss(outputs, targets) (True) or loss(outputs) (False), from its signature.

    Two required positional parameters -> True; at most one positional parameter -> False; a callable that
    accepts either (an optional second parameter, *args, no readable signature) -> `default`.
    """
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        return default
    required = capacity = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            capacity = 2**31
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            capacity += 1
            required += p.default is p.empty
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            required = 3  # cannot be called with positional arguments alone
    if required > 2 or capacity == 0:
        raise LossSpecError(
            f"the loss callable {_callable_name(fn)}{sig} cannot be called as loss(outputs) or loss(outputs, targets)",
            "pass a callable of one argument (the model outputs) or two (outputs, targets)",
        )
    if required == 2:
        return True
    if capacity < 2:
        return False
    return default


def _cast_like(targets: Any, like: Tensor | None) -> Any:
    """Targets moved to `like`'s device, floating ones cast to its dtype (tensors only; other values as they are)."""
    if like is None or not isinstance(targets, Tensor):
        return targets
    targets = targets.to(like.device)
    return targets.to(like.dtype) if targets.is_floating_point() else targets

