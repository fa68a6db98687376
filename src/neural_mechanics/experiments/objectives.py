"""What a run optimises and how a model's outputs meet its targets: a registry of objectives, one per loss name.

The `loss` section of a training config names one (`loss: next_token`, `loss: {name: cross_entropy, class_dim: 1}`),
and `nmech symmetries` / `nmech check` take the same names (`--loss`, `--class-dim`):

| name            | outputs                               | targets                  | loss per target element  |
|-----------------|---------------------------------------|--------------------------|--------------------------|
| `cross_entropy` | logits (N, C, *S), classes on axis    | class indices (N, *S)    | -log softmax(z)[y]       |
|                 | `class_dim` (default 1): (N, C) for a |                          |                          |
|                 | label per example, (N, C, H, W) per   |                          |                          |
|                 | pixel                                 |                          |                          |
| `next_token`    | token logits (B, T, V)                | next token ids (B, T)    | -log softmax_V(z)[y]     |
| `mse`           | one tensor                            | floats, the same shape   | (out - y)^2              |

`softmax` is another name for `cross_entropy` and `none` for `mse` (the names `--loss` has always taken).

From one name an `Objective` gives everything a run needs, so the loss trained is the loss whose symmetries are
tracked:

- `spec`: the `LossSpec` symmetry detection, certification and the constraint checks read (symmetry/loss.py);
  cross-entropy with any targets is a function of log_softmax over the class axis, so the symmetries found hold
  for every target;
- `loss(outputs, targets, reduction)`: "mean" (training) is the mean over target elements, "sum" their sum;
- `count(targets)`: predictions in a batch (target elements: one per example, pixel or token) and
  `correct(outputs, targets)`: how many are right (argmax over the class axis; None for `mse`: no accuracy);
- `check(outputs, targets)`: a wrong pairing of output and target raises `LossSpecError` saying which shapes were
  expected and which loss fits what was found, before a single step (never a traceback from inside torch);
- `random_targets(outputs, generator)`: seeded targets shaped after an output (`nmech check`, which has no data).

A new objective is one `register_objective(ObjectiveSpec(...))`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neural_mechanics.errors import ConfigError, LossSpecError
from neural_mechanics.symmetry.loss import IGNORE_INDEX, LossSpec, first_tensor


@dataclass(frozen=True)
class LossConfig:
    """The `loss` section of a training config: `name` is a registered objective (`objective_names()`); `class_dim`
    is the class axis of the outputs for cross_entropy (None: 1, the `F.cross_entropy` convention)."""

    name: str = "cross_entropy"
    class_dim: int | None = None

    def __post_init__(self) -> None:
        try:
            spec = get_objective(self.name)
        except LossSpecError as exc:  # in a config it is the config that is wrong
            raise ConfigError(f"loss.name: {exc.what}", exc.fix) from None
        if self.class_dim is not None and not spec.has_class_dim:
            raise ConfigError(f"loss.class_dim: {spec.name} has no class axis to choose",
                              "remove loss.class_dim (only cross_entropy takes it)")


@dataclass(frozen=True)
class Objective:
    """One loss with its targets (see the module docstring). `kind` "softmax": cross-entropy over axis `class_dim`
    of the logits; "plain": mean squared error of the one output tensor."""

    name: str
    spec: LossSpec
    description: str = ""

    @property
    def has_accuracy(self) -> bool:
        """Whether `correct` counts anything (classification) or returns None (regression)."""
        return self.spec.kind == "softmax"

    # -- reading outputs ---------------------------------------------------------------------------------------

    def prediction(self, outputs: Any) -> Tensor:
        """The tensor the loss reads: the logits (a tensor, a tuple's first tensor, a dict's or a Hugging Face
        output's "logits") for cross-entropy; the single output tensor for mse."""
        if self.spec.kind == "softmax":
            return first_tensor(outputs)
        if not isinstance(outputs, Tensor):
            raise LossSpecError(f"loss {self.name!r} needs the model to return one tensor, got "
                                f"{type(outputs).__name__}", "return a tensor from forward, or use a softmax loss")
        return outputs

    def class_axis(self, z: Tensor) -> int:
        """The non-negative class axis of logits `z` (batched: at least (N, C))."""
        if z.ndim < 2:
            raise LossSpecError(f"loss {self.name!r} needs batched logits of shape (N, C, ...), the model returned "
                                f"shape {tuple(z.shape)}", "return one row of logits per example")
        class_dim = self.spec.axis(z) if self.spec.class_dim is None else self.spec.class_dim  # None: loss.py's rule
        if not -z.ndim <= class_dim < z.ndim:
            raise LossSpecError(f"loss {self.name!r}: class axis {class_dim} is out of range for outputs "
                                f"of shape {tuple(z.shape)}", "set loss.class_dim (--class-dim) to the class axis")
        return class_dim % z.ndim

    # -- what a run computes -----------------------------------------------------------------------------------

    def loss(self, outputs: Any, targets: Tensor, reduction: str = "mean") -> Tensor:
        """The loss over a batch in float32 (or wider): mean ("mean") or sum ("sum") over target elements."""
        z = self.prediction(outputs)
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()
        if self.spec.kind == "plain":
            return F.mse_loss(z, targets.to(z.dtype), reduction=reduction)
        axis = self.class_axis(z)
        return F.cross_entropy(z if axis == 1 else z.movedim(axis, 1), targets, reduction=reduction)

    def count(self, targets: Tensor) -> int:
        """Predictions in a batch: the number of target elements (examples, pixels or tokens)."""
        return int(targets.numel())

    def correct(self, outputs: Any, targets: Tensor) -> Tensor | None:
        """How many predictions are right (a 0-d tensor): argmax over the class axis equals the target; None when the
        objective has no accuracy (mse)."""
        if not self.has_accuracy:
            return None
        z = self.prediction(outputs)
        return (z.argmax(self.class_axis(z)) == targets).sum()

    def random_targets(self, outputs: Any, generator: torch.Generator) -> Tensor:
        """Seeded targets that fit `outputs`: class indices over the class axis, or standard-normal values for mse."""
        z = self.prediction(outputs)
        if self.spec.kind == "plain":
            return torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        axis = self.class_axis(z)
        shape = (*z.shape[:axis], *z.shape[axis + 1 :])
        return torch.randint(0, z.shape[axis], shape, generator=generator).to(z.device)

    # -- the pairing check -------------------------------------------------------------------------------------

    def check(self, outputs: Any, targets: Any) -> None:
        """LossSpecError unless `targets` fit `outputs` under this loss (shapes, dtype, class range)."""
        z = self.prediction(outputs)
        if not isinstance(targets, Tensor):
            raise LossSpecError(f"loss {self.name!r}: the targets are a {type(targets).__name__}, not a tensor",
                                "make the dataset's items (input, target) pairs with a tensor or int target")
        zs, ys = tuple(z.shape), tuple(targets.shape)
        if self.spec.kind == "plain":
            if not targets.is_floating_point():
                raise LossSpecError(f"loss {self.name!r}: the targets are integers ({targets.dtype}, shape {ys}), "
                                    "which look like class labels", "use loss cross_entropy for class labels "
                                    "(or next_token for token ids); mse needs float targets")
            if zs != ys:
                raise LossSpecError(f"loss {self.name!r}: the model outputs shape {zs} but the targets have shape {ys}",
                                    "mse compares outputs and targets element by element: make the model's output "
                                    f"shape equal the targets' (e.g. num_classes {ys[-1] if ys else 1})")
            return
        axis = self.class_axis(z)
        expected = (*zs[:axis], *zs[axis + 1 :])
        if targets.is_floating_point():
            raise LossSpecError(f"loss {self.name!r}: the targets are {targets.dtype} values of shape {ys}, but "
                                "cross-entropy needs class indices", "use loss mse for real-valued targets, or store "
                                "integer class labels")
        if ys != expected:
            raise LossSpecError(
                f"loss {self.name!r}: the model outputs {zs} (classes on axis {axis}) but the targets have shape {ys}; "
                f"{self.name} needs targets of shape {expected}", self._shape_hint(zs, ys, axis))
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= zs[axis]):
            raise LossSpecError(
                f"loss {self.name!r}: the targets range over [{int(valid.min())}, {int(valid.max())}] but the model "
                f"outputs {zs[axis]} classes (axis {axis} of {zs})",
                f"give the model {int(valid.max()) + 1} outputs (config: num_classes: {int(valid.max()) + 1}), or "
                "check the labels (they must be 0 .. classes-1)")

    def _shape_hint(self, zs: tuple[int, ...], ys: tuple[int, ...], axis: int) -> str:
        if len(zs) == 3 and ys == zs[:2] and axis != 2:
            return ("these look like token logits (B, T, V) with next-token targets (B, T): use loss next_token "
                    "(the softmax over the last axis), or loss.class_dim: -1")
        if len(zs) == 2 and len(ys) >= 2:
            return (f"the targets hold one label per position {ys[1:]} (per pixel or per token), but the model "
                    f"outputs one row of {zs[1]} logits per example: a per-pixel model outputs (N, C, *positions), "
                    "e.g. (N, C, H, W) for images")
        if len(zs) > 2 and len(ys) == 1:
            return (f"the targets hold one label per example, but the model outputs extra axes {zs[2:]}: pool them "
                    "(e.g. a global average pool before the head), or give one target per position")
        return "make the model's outputs and the dataset's targets agree (loss.class_dim chooses the class axis)"


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: `build(class_dim)` makes its `Objective`; `has_class_dim`: it takes `class_dim`."""

    name: str
    build: Callable[[int | None], Objective]
    description: str
    aliases: tuple[str, ...] = ()
    has_class_dim: bool = False


#: The registry (name -> spec) in registration order; aliases map other names to registered ones.
OBJECTIVES: dict[str, ObjectiveSpec] = {}
_ALIASES: dict[str, str] = {}


def register_objective(spec: ObjectiveSpec, *, replace: bool = False) -> ObjectiveSpec:
    """Add `spec` (and its aliases) to the registry; ValueError if a name is taken, unless replace=True."""
    clash = [n for n in (spec.name, *spec.aliases) if n in OBJECTIVES or n in _ALIASES]
    if clash and not replace:
        raise ValueError(f"objective name(s) {clash} already registered (pass replace=True)")
    OBJECTIVES[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def objective_names() -> tuple[str, ...]:
    """The registered objective names (without aliases), in registration order."""
    return tuple(OBJECTIVES)


def get_objective(name: str) -> ObjectiveSpec:
    """The spec for `name` (any case, aliases allowed); LossSpecError with close matches if there is none."""
    key = name.strip().lower()
    spec = OBJECTIVES.get(_ALIASES.get(key, key))
    if spec is None:
        close = difflib.get_close_matches(key, [*OBJECTIVES, *_ALIASES], n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise LossSpecError(f"unknown loss {name!r}", f"{hint}losses: {', '.join(objective_names())}")
    return spec


def build_objective(loss: LossConfig | str | None = "cross_entropy", class_dim: int | None = None) -> Objective:
    """The Objective a config section (or a name plus an optional class axis, as the CLI gives them) names.

    loss None (`nmech symmetries` / `check` without --loss): softmax cross-entropy with the class axis of
    `symmetry.loss.class_axis` unless class_dim is given: the last axis of token logits (B, T, V), else axis 1.
    A config's `cross_entropy` keeps axis 1 (a training run states its loss; token logits there need next_token).
    """
    if loss is None:
        return Objective("cross_entropy", LossSpec.cross_entropy(class_dim=class_dim),
                         "softmax cross-entropy over the class axis (the vocabulary of token logits (B, T, V))")
    name = loss.name if isinstance(loss, LossConfig) else loss
    class_dim = loss.class_dim if isinstance(loss, LossConfig) else class_dim
    spec = get_objective(name)
    if class_dim is not None and not spec.has_class_dim:
        raise LossSpecError(f"loss {spec.name!r} has no class axis to choose", "drop --class-dim (loss.class_dim)")
    return spec.build(class_dim)


def _cross_entropy(class_dim: int | None) -> Objective:
    return Objective("cross_entropy", LossSpec.cross_entropy(class_dim=1 if class_dim is None else class_dim),
                     "softmax cross-entropy over the class axis")


register_objective(ObjectiveSpec(
    "cross_entropy", _cross_entropy,
    "softmax cross-entropy: logits (N, C, ...) with classes on class_dim (default 1) against class indices "
    "(N, ...): one label per example, per pixel (segmentation) or per position",
    aliases=("softmax",), has_class_dim=True))
register_objective(ObjectiveSpec(
    "next_token",
    lambda _: Objective("next_token", LossSpec.cross_entropy(class_dim=-1, name="next_token"),
                        "next-token cross-entropy over the vocabulary (last axis)"),
    "language modelling: token logits (B, T, V) against the next token ids (B, T), softmax over the vocabulary"))
register_objective(ObjectiveSpec(
    "mse",
    lambda _: Objective("mse", LossSpec.plain("mse"), "mean squared error"),
    "mean squared error of the one output tensor against float targets of the same shape (no softmax, so no "
    "translation symmetry)",
    aliases=("none",)))
