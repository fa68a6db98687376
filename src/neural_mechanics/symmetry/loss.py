"""One loss specification shared by `find_symmetries`, `certify` and `check_constraints`.

A symmetry is a statement about the model *and* the loss, L(psi(theta, alpha)) = L(theta), so the three
entry points must mean the same loss by the same argument. Each accepts a `LossLike` and converts it with
one function, `as_loss_spec`, into a `LossSpec`:

| argument                   | kind    | find_symmetries captures    | certify / check_constraints   | compared  |
|----------------------------|---------|-----------------------------|-------------------------------|-----------|
| "cross_entropy", "softmax" | softmax | sum(log_softmax(z, axis))   | cross_entropy(z, targets)     | logits z  |
| "next_token"               | softmax | sum(log_softmax(z, -1))     | CE(z, targets) over V         | logits z  |
| "causal_lm"                | softmax | sum(log_softmax(z[:, :-1])) | CE(z[:, :-1], targets[:, 1:]) | z[:, :-1] |
| "masked_token"             | softmax | sum(log_softmax(z, -1))     | CE(z, targets), -100 ignored  | logits z  |
| "mse", "none", None        | plain   | the outputs themselves      | sum of mse(output, target)    | outputs   |
| loss(outputs) -> scalar    | custom  | loss(outputs)               | loss(outputs)                 | its reads |
| loss(outputs, targets)     | custom  | refused (needs targets)     | loss(outputs, targets)        | its reads |
| a LossSpec                 | its own |                             |                               |           |

* The softmax stand-in: cross-entropy with any targets is a function of log_softmax over the class axis at
  the positions it scores, and every entry of it is reached by some target, so the symmetries that hold for
  every target are those of log_softmax(z) at those positions; sum(log_softmax(z)) over them is the graph
  the detector reads (docs/theory.md section 1, translation). The causal_lm stand-in slices off the last
  position, exactly as the real loss does, so it reads exactly what the real loss reads.
* The logits z of an output (`outputs.locate_logits`): the tensor itself, a dict's (or Hugging Face output's)
  "logits", an object's `.logits`, or the first tensor of a tuple. Certify compares only what the loss reads
  (`LossSpec.reads`), so extra outputs (an auxiliary head, an encoder state) do not fail real groups; for a
  callable loss, what it reads is found by autograd (`outputs.read_leaves`).
* The class axis (`class_axis`, one rule for all three entry points): `class_dim` when the LossSpec gives it;
  otherwise axis 0 of 1-D logits, the LAST axis of 3-D logits (B, T, V) (token logits: each position has its
  own softmax over the vocabulary, the convention of sequence models), and axis 1 for every other rank
  ((N, C), (N, C, H, W) segmentation, (N, C, D, H, W): `F.cross_entropy`'s convention). A per-position
  classifier that returns (N, C, L) needs `LossSpec.cross_entropy(class_dim=1)`.
* Token losses (softmax over the last axis, the vocabulary): "next_token" scores the logits at position t
  against the target at t, targets (B, T) being the NEXT token ids (already shifted: the pairs the "tokens"
  dataset yields, and the training objective of the same name, experiments/objectives.py); "causal_lm" takes
  targets aligned with the inputs (typically the input ids themselves, Hugging Face's `labels=input_ids`) and
  scores position t against target t + 1 (the last position is not scored); "masked_token" scores every position
  whose target is not -100 (targets (B, T), -100 where no token is predicted, the masked-LM convention).
* Targets: certify uses the given ones or seeded random ones (class indices over the class axis, every
  position scored; standard normal for mse); check_constraints takes them from its (inputs, targets) batch.
  For mse with several output tensors, targets are a list with one tensor per output tensor (pytree order).
* A plain callable's form is read from its signature: two required positional parameters ->
  loss(outputs, targets), a single positional parameter -> loss(outputs). A callable that accepts either
  (`f(out, y=None)`, `*args`, no signature) keeps each entry point's historical reading: loss(outputs)
  for find_symmetries and certify, loss(outputs, targets) for check_constraints. Say it explicitly with
  `LossSpec.of_outputs(fn)` / `LossSpec.of_outputs_and_targets(fn)`.

`LossSpec` itself (its kinds, constructors, what each entry point reads, the binding of targets) is
symmetry/loss_spec.py; this module is the conversion of the loss argument and the names the project imports from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from neural_mechanics.errors import LossSpecError
from neural_mechanics.symmetry.loss_spec import IGNORE_INDEX, LossSpec, callable_name, class_axis, softmax_loss
from neural_mechanics.symmetry.outputs import first_tensor, output_tensors

__all__ = [
    "IGNORE_INDEX",
    "NAMED_LOSSES",
    "LossLike",
    "LossSpec",
    "as_loss_spec",
    "class_axis",
    "first_tensor",
    "output_tensors",
    "softmax_loss",
]


LossLike = str | Callable[..., Any] | LossSpec | None
"""What the three entry points accept as their loss argument (see the module docstring)."""

NAMED_LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec.cross_entropy(),
    "softmax": LossSpec.cross_entropy(name="softmax"),
    "next_token": LossSpec.next_token(),
    "causal_lm": LossSpec.next_token(shift=True),
    "masked_token": LossSpec.masked_token(),
    "mse": LossSpec.plain("mse"),
    "none": LossSpec.plain("none"),
}
"""The losses a string names (lower-case)."""


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
        return LossSpec("custom", callable_name(loss), fn=loss,
                        takes_targets=_takes_targets(loss, default=targets_by_default))
    raise LossSpecError(f"loss must be a string, None, a callable or a LossSpec, got {type(loss).__name__}",
                        "pass loss='cross_entropy', loss='mse', a callable loss(outputs) -> scalar, or a LossSpec")


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
            f"the loss callable {callable_name(fn)}{sig} cannot be called as loss(outputs) or loss(outputs, targets)",
            "pass a callable of one argument (the model outputs) or two (outputs, targets)",
        )
    if required == 2:
        return True
    if capacity < 2:
        return False
    return default
