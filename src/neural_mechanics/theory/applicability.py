"""Which predictions of the theory hold for an optimizer's param_group, and if not, why not: the one decision.

Three predictions are made per symmetry group (docs/theory.md sections 3 and 5):

* `exact`: the exact discrete recurrence of torch.optim.SGD with the breaking term B = 0 (the symmetry alone);
* `breaking`: the same recurrence fed the measured breaking term B_k (matches the measurement to rounding);
* `paper`: the paper's continuous model (modified gradient flow; heavy ball as a damped oscillator).

The recurrences in `exact.py` mirror torch.optim.SGD's update rule line by line, for every hyperparameter value
torch accepts: plain, heavy ball, Nesterov, weight decay, maximize, and any dampening tau. In particular tau = 1
is well defined for them: b_k = beta b_{k-1} + (1 - tau) d_k keeps the first buffer b_0 = d_0 (scaled by beta
each step) and the recurrence follows it exactly. The continuous model is not: with momentum it runs on the time
step h = eta (1 - tau), which is 0 at tau = 1 (negative beyond), so its oscillator has no time to evolve and its
kick 2 eta / (1 - tau) |b|^2 is infinite. So at dampening >= 1 (with momentum) `exact` and `breaking` apply and
`paper` does not. (Momentum 0 ignores dampening: all three apply.)

Other optimizers change the direction of the step in a parameter-dependent way: Adam, AdamW, RMSprop, Adagrad,
... divide by a running second-moment estimate, which is not equivariant under the symmetry, so <D theta_k, u_k>
is no longer fixed by the charge (the "optimizer breaks the conservation law"); none of the three applies. This
module classifies instead of guessing; the tracker, its strategies and the report all ask `applicability`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neural_mechanics.theory.hyper import Hyper

__all__ = ["PREDICTION_KINDS", "Applicability", "Verdict", "applicability", "exact_theory_applies",
           "hyper_from_sgd_group"]

PREDICTION_KINDS = ("exact", "breaking", "paper")
"""The predictions `Applicability` decides, in the order the run store shows them (`predicted_<kind>`)."""

_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
             "Adafactor", "Lamb", "LAMB", "Lion", "Adan", "AdaBelief", "Shampoo", "Muon")
ADAPTIVE_REASON = "adaptive preconditioner breaks the conservation law"


@dataclass(frozen=True)
class Verdict:
    """Whether one prediction applies, and the reason in words (why it applies, or why not)."""

    applies: bool
    reason: str


@dataclass(frozen=True)
class Applicability:
    """The verdict for each prediction (`exact`, `breaking`, `paper`) on one param_group."""

    exact: Verdict
    breaking: Verdict
    paper: Verdict

    def items(self) -> Iterator[tuple[str, Verdict]]:
        """(kind, verdict) in PREDICTION_KINDS order."""
        for kind in PREDICTION_KINDS:
            yield kind, getattr(self, kind)

    @classmethod
    def none(cls, reason: str) -> Applicability:
        """No prediction applies, for one reason."""
        v = Verdict(False, reason)
        return cls(v, v, v)


def _not_sgd(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> str | None:
    """Why the optimizer's update rule is not torch.optim.SGD's (None when it is)."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.SGD):
        if name == "LBFGS":
            return "LBFGS: quasi-Newton direction (curvature-preconditioned, line search) breaks the law"
        if name == "Rprop":
            return "Rprop: steps by the sign of the gradient with per-entry sizes; the law is broken"
        if name == "ASGD":
            return "ASGD: internal step-size schedule not exposed per step; exact theory not implemented"
        if name in _ADAPTIVE or any(k in group for k in ("betas", "rho", "lr_decay", "initial_accumulator_value")):
            return f"{name}: {ADAPTIVE_REASON}"
        return f"{name}: not torch.optim.SGD; the exact recurrences are derived for torch.optim.SGD only"
    if type(optimizer).step is not torch.optim.SGD.step:
        return f"{name} overrides SGD.step; the update rule is unknown"
    return None


def applicability(optimizer: torch.optim.Optimizer, group: Mapping[str, Any] | None = None) -> Applicability:
    """Which of the three predictions hold for `group` (a param_group of `optimizer`; None: the optimizer alone).

    All three apply to torch.optim.SGD (and subclasses that keep SGD.step) with real floating-point parameters,
    any lr, momentum, Nesterov, weight decay, maximize (handled as B -> -B), foreach or fused kernels (same
    arithmetic) and dampening tau < 1. With momentum and tau >= 1 the exact and breaking recurrences still apply
    but the paper's continuous model does not (its time step h = eta (1 - tau) is not positive). None applies
    to adaptive optimizers, LBFGS, Rprop (sign of the gradient), ASGD (hidden internal step-size schedule and
    averaging), anything unknown, complex or sparse-gradient parameters. Without a group only the optimizer's
    class is judged (what the tracker's strategy registry asks).
    """
    why_not = _not_sgd(optimizer, group or {})
    if why_not is not None:
        return Applicability.none(why_not)
    group = group or {}
    for p in group.get("params", ()):
        if p.is_complex():
            return Applicability.none("complex parameters: the charges are defined for real parameters")
        if p.grad is not None and p.grad.is_sparse:
            return Applicability.none("sparse gradients: not supported by the exact recurrences")
    why = "torch.optim.SGD: exact discrete recurrence applies"
    if group.get("maximize", False):
        why += " (maximize: the breaking term enters with the opposite sign)"
    exact = Verdict(True, why)
    paper = Verdict(True, "torch.optim.SGD: the paper's continuous model (modified gradient flow) applies")
    momentum, tau = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    if momentum != 0 and tau >= 1:
        h = "zero" if tau == 1 else "negative"
        paper = Verdict(False, f"dampening {tau:g} >= 1 with momentum {momentum:g}: the paper's continuous model "
                               f"runs on the time step h = eta (1 - dampening), here {h}, so it has no prediction "
                               "(the exact recurrences still apply)")
    return Applicability(exact, exact, paper)


def exact_theory_applies(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> tuple[bool, str]:
    """(True, why) when the exact recurrence (docs/theory.md section 5) predicts this param_group, else (False, why).

    The `exact` verdict of `applicability` as a tuple (see there for the rules).
    """
    v = applicability(optimizer, group).exact
    return v.applies, v.reason


def hyper_from_sgd_group(group: Mapping[str, Any], *, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float64) -> Hyper:
    """The `Hyper` (0-d tensors) of one torch.optim.SGD param_group, read now (call every step for schedules)."""
    return Hyper.from_sgd_group(group, device=device, dtype=dtype)
