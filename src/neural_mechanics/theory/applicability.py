"""Does the exact theory apply to an optimizer's param_group, and if not, why not?

The recurrences in `exact.py` mirror torch.optim.SGD's update rule line by line. Other optimizers change the
direction of the step in a parameter-dependent way: Adam, AdamW, RMSprop, Adagrad, ... divide by a running
second-moment estimate, which is not equivariant under the symmetry, so <D theta_k, u_k> is no longer fixed by the
charge (the "optimizer breaks the conservation law"). This module classifies instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neural_mechanics.theory.hyper import Hyper

__all__ = ["exact_theory_applies", "hyper_from_sgd_group"]

_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
             "Adafactor", "Lamb", "LAMB", "Lion", "Adan", "AdaBelief", "Shampoo", "Muon")
ADAPTIVE_REASON = "adaptive preconditioner breaks the conservation law"


def exact_theory_applies(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> tuple[bool, str]:
    """(True, why) when docs/theory.md section 5 predicts this param_group exactly, else (False, the reason).

    Applies: torch.optim.SGD (and subclasses that keep SGD.step) with real floating-point parameters, any lr,
    momentum, dampening < 1, Nesterov, weight decay, maximize (handled as B -> -B), foreach or fused kernels
    (same arithmetic). Not: adaptive optimizers, LBFGS, Rprop (sign of the gradient), ASGD (hidden internal
    step-size schedule and averaging), anything unknown, complex or sparse-gradient parameters.
    """
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.SGD):
        if name == "LBFGS":
            return False, "LBFGS: quasi-Newton direction (curvature-preconditioned, line search) breaks the law"
        if name == "Rprop":
            return False, "Rprop: steps by the sign of the gradient with per-entry sizes; the law is broken"
        if name == "ASGD":
            return False, "ASGD: internal step-size schedule not exposed per step; exact theory not implemented"
        if name in _ADAPTIVE or any(k in group for k in ("betas", "rho", "lr_decay", "initial_accumulator_value")):
            return False, f"{name}: {ADAPTIVE_REASON}"
        return False, f"{name}: not torch.optim.SGD; the exact recurrences are derived for torch.optim.SGD only"
    if type(optimizer).step is not torch.optim.SGD.step:
        return False, f"{name} overrides SGD.step; the update rule is unknown"
    for p in group.get("params", ()):
        if p.is_complex():
            return False, "complex parameters: the charges are defined for real parameters"
        if p.grad is not None and p.grad.is_sparse:
            return False, "sparse gradients: not supported by the exact recurrences"
    if group.get("dampening", 0.0) >= 1 and group.get("momentum", 0.0) != 0:
        return False, "dampening >= 1 freezes the momentum buffer; not supported"
    why = "torch.optim.SGD: exact discrete recurrence applies"
    if group.get("maximize", False):
        why += " (maximize: the breaking term enters with the opposite sign)"
    return True, why


def hyper_from_sgd_group(group: Mapping[str, Any], *, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float64) -> Hyper:
    """The `Hyper` (0-d tensors) of one torch.optim.SGD param_group, read now (call every step for schedules)."""
    return Hyper.from_sgd_group(group, device=device, dtype=dtype)
