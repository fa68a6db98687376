"""What `nmech symmetries` and `nmech check` compute, as library calls (the CLI only parses and prints).

`load_example` turns a MODEL spec into the model (in train or eval mode) and a seeded example batch.
`check_model` is the whole constraint check of `nmech check`: find the groups, set aside those whose action
does not leave the loss unchanged (`uncertified_groups`: a group that fails certification is not a symmetry of
this model at this point, so its constraint would test nothing), then check the gradient and Hessian
constraints of the rest on the example batch with seeded random class targets under cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from neural_mechanics.constraints import ConstraintReport, check_constraints
from neural_mechanics.experiments.specs import ResolvedModel, resolve_model
from neural_mechanics.symmetry import SymmetrySet
from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries

#: Which kinds' groups a failed all-at-once composition in `certify` may hide a failing group in.
_COMPOSED_KINDS = {"all": ("translation", "scale", "rescale"), "scale+rescale": ("scale", "rescale")}


def load_example(spec: str, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 batch: int = 4, seed: int = 0, eval_mode: bool = False) -> tuple[ResolvedModel, Tensor]:
    """The model a MODEL spec names (`resolve_model`, with `input_shape` applied) in train mode (eval mode if
    asked), and its seeded example batch of `batch` inputs."""
    resolved = resolve_model(spec, num_classes=num_classes, input_shape=input_shape)
    inputs = resolved.example_inputs(batch, seed=seed)
    resolved.model.train(not eval_mode)
    return resolved, inputs


def uncertified_groups(model: torch.nn.Module, found: SymmetrySet, inputs: Tensor, seed: int = 0) -> set[str]:
    """Names of groups whose action changes the loss. Certify a sample of each kind alone plus every kind's
    composition at once; only where a composition fails, certify that kind's groups one by one."""
    cert = certify(model, found, inputs, seed=seed)
    failed = {r.name for r in cert.results if not r.passed}
    bad_kinds = {k for r in cert.all_at_once if not r.passed for k in _COMPOSED_KINDS.get(r.kind, (r.kind,))}
    for kind in sorted(bad_kinds):
        per_group = certify(model, found.filter(kind=kind), inputs, seed=seed, sample=None)
        failed |= {r.name for r in per_group.results if not r.passed}
    return failed


@dataclass(frozen=True, eq=False)
class ModelCheck:
    """The outcome of `check_model`: every group found, the names of those left out because they did not
    certify, and the constraint report of the others (None when no group was found)."""

    found: SymmetrySet
    uncertified: frozenset[str]
    report: ConstraintReport | None


def check_model(resolved: ResolvedModel, inputs: Tensor, *, hessian: bool = True, seed: int = 0) -> ModelCheck:
    """Find the groups of `resolved.model` on `inputs`, drop those that do not certify, and check the gradient (and
    Hessian) constraints of the rest against random baselines, in float64, with cross-entropy against seeded
    random targets in range(resolved.num_classes)."""
    model = resolved.model
    found = find_symmetries(model, inputs)
    if not len(found):
        return ModelCheck(found, frozenset(), None)
    failed = uncertified_groups(model, found, inputs, seed)
    certified = found.__class__([s for s in found if s.name not in failed], found.meta)
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, resolved.num_classes, (len(inputs),), generator=gen)  # type: ignore[arg-type]
    report = check_constraints(model, F.cross_entropy, (inputs, targets), certified, hessian=hessian, seed=seed)
    return ModelCheck(found, frozenset(failed), report)
