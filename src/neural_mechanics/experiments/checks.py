"""What `nmech symmetries` and `nmech check` compute, as library calls (the CLI only parses and prints).

`load_example` turns a MODEL spec into the model (in train or eval mode) and a seeded example batch (float inputs,
or token ids below the vocabulary for a model that reads tokens). `check_model` is the whole constraint check of
`nmech check`: run the model once (a model that rejects the example is an InputShapeError, not a traceback), draw
seeded random targets shaped after its output under the chosen loss (`Objective.random_targets`: a class per
example for (N, C) logits, per pixel for (N, C, H, W), per token for next-token logits, real values for mse), find
the groups of that loss, set aside those whose action does not leave the loss unchanged (`uncertified_groups`: a
group that fails certification is not a symmetry of this model at this point, so its constraint would test
nothing), then check the gradient and Hessian constraints of the rest on the example batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neural_mechanics.constraints import ConstraintReport, check_constraints
from neural_mechanics.errors import InputShapeError
from neural_mechanics.experiments.objectives import Objective, build_objective
from neural_mechanics.experiments.specs import ResolvedModel, resolve_model
from neural_mechanics.symmetry import SymmetrySet
from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.loss import LossLike
from neural_mechanics.symmetry.utils import fixed_rng

#: Which kinds' groups a failed all-at-once composition in `certify` may hide a failing group in.
_COMPOSED_KINDS = {"all": ("translation", "scale", "rescale"), "scale+rescale": ("scale", "rescale")}
#: What a model raises when it cannot run on an input (wrong shape or dtype, torch._assert, a plain assert).
MODEL_INPUT_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError)


def load_example(spec: str, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 batch: int = 4, seed: int = 0, eval_mode: bool = False, input_dtype: torch.dtype | None = None,
                 vocab_size: int | None = None, overrides: dict[str, Any] | None = None
                 ) -> tuple[ResolvedModel, Tensor]:
    """The model a MODEL spec names (`resolve_model`, with `input_shape`, `input_dtype`, `vocab_size` and the
    `overrides` of a timm: / hf: model applied) in train mode (eval mode if asked), and its seeded example batch of
    `batch` inputs."""
    resolved = resolve_model(spec, num_classes=num_classes, input_shape=input_shape, input_dtype=input_dtype,
                             vocab_size=vocab_size, overrides=overrides)
    inputs = resolved.example_inputs(batch, seed=seed)
    resolved.model.train(not eval_mode)
    return resolved, inputs


def forward_once(model: torch.nn.Module, inputs: Tensor, seed: int = 0) -> Any:
    """`model(inputs)` without side effects: no gradient, the RNG forked (seeded by `seed`), buffers (BatchNorm's
    running statistics) restored afterwards. Whatever the model raises propagates."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad(), fixed_rng(seed, inputs.device):
            return model(inputs)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def run_example(resolved: ResolvedModel, inputs: Tensor, seed: int = 0) -> Any:
    """The model's output on `inputs` (`forward_once`), or an InputShapeError saying which input the model rejected
    and how to give another."""
    try:
        return forward_once(resolved.model, inputs, seed)
    except MODEL_INPUT_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = (f"token ids below {resolved.vocab_size}" if resolved.vocab_size is not None
                else str(inputs.dtype).removeprefix("torch."))
        raise InputShapeError(
            f"{resolved.spec} cannot run on an example batch of shape {tuple(inputs.shape)} ({kind}): "
            f"{type(exc).__name__}: {first}",
            "give the shape of one input without the batch dim with --input-shape (e.g. 3,64,64, or 16 tokens), "
            "and --input-dtype long --vocab N for token ids") from exc


def uncertified_groups(model: torch.nn.Module, found: SymmetrySet, inputs: Tensor, seed: int = 0,
                       loss: LossLike = "cross_entropy") -> set[str]:
    """Names of groups whose action changes the loss. Certify a sample of each kind alone plus every kind's
    composition at once; only where a composition fails, certify that kind's groups one by one."""
    cert = certify(model, found, inputs, loss=loss, seed=seed)
    failed = {r.name for r in cert.results if not r.passed}
    bad_kinds = {k for r in cert.all_at_once if not r.passed for k in _COMPOSED_KINDS.get(r.kind, (r.kind,))}
    for kind in sorted(bad_kinds):
        per_group = certify(model, found.filter(kind=kind), inputs, loss=loss, seed=seed, sample=None)
        failed |= {r.name for r in per_group.results if not r.passed}
    return failed


@dataclass(frozen=True, eq=False)
class ModelCheck:
    """The outcome of `check_model`: every group found, the names of those left out because they did not
    certify, and the constraint report of the others (None when no group was found)."""

    found: SymmetrySet
    uncertified: frozenset[str]
    report: ConstraintReport | None


def check_model(resolved: ResolvedModel, inputs: Tensor, *, hessian: bool = True, seed: int = 0,
                objective: Objective | None = None) -> ModelCheck:
    """Find the groups of `resolved.model` under `objective`'s loss (default: cross-entropy over dim 1) on `inputs`,
    drop those that do not certify, and check the gradient (and Hessian) constraints of the rest against random
    baselines, in float64, against seeded random targets shaped after the model's output."""
    objective = objective or build_objective("cross_entropy")
    outputs = run_example(resolved, inputs, seed)
    targets = objective.random_targets(outputs, torch.Generator().manual_seed(seed))
    objective.check(outputs, targets)
    model = resolved.model
    found = find_symmetries(model, inputs, loss=objective.spec)
    if not len(found):
        return ModelCheck(found, frozenset(), None)
    failed = uncertified_groups(model, found, inputs, seed, loss=objective.spec)
    certified = found.__class__([s for s in found if s.name not in failed], found.meta)
    report = check_constraints(model, objective.spec, (inputs, targets), certified, hessian=hessian, seed=seed)
    return ModelCheck(found, frozenset(failed), report)
