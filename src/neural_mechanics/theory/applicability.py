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
is no longer fixed by the charge (the "optimizer breaks the conservation law"): there is no symmetry-only
prediction (`exact`) and the paper's model (derived for SGD) does not apply. For the update rules the tracker can
read from the optimizer's state (`identity_rule`: Adam / AdamW, RMSprop, Lion, Muon) the exact step identity of
docs/theory.md section 6.1 still holds, so `breaking` applies: the identity fed the measured optimizer term
<D theta_k, u_k>. Every other optimizer gets no prediction. `equilibrium` decides, separately, whether a scale
group has a weight-decay equilibrium the theory predicts (docs/theory.md sections 3.5 and 6.3), and if not why.
This module classifies instead of guessing; the tracker, its strategies and the report all ask it.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neural_mechanics.theory.hyper import Hyper

__all__ = ["IDENTITY_RULES", "PREDICTION_KINDS", "Applicability", "Verdict", "applicability", "decoupled_decay",
           "equilibrium", "exact_theory_applies", "hyper_from_sgd_group", "identity_rule", "keeps_step"]

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


def keeps_step(optimizer: torch.optim.Optimizer, cls: type) -> bool:
    """Whether `optimizer` is a `cls` whose `step` is `cls.step` (a subclass that overrides it has another rule).

    Compared through `inspect.unwrap`: torch wraps `step` in a profiling hook on the class of the first instance,
    so a subclass instantiated before its base carries its own wrapper around the very same function.
    """
    step = getattr(cls, "step", None)
    return (isinstance(optimizer, cls) and step is not None
            and inspect.unwrap(type(optimizer).step) is inspect.unwrap(step))


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
    if not keeps_step(optimizer, torch.optim.SGD):
        return f"{name} overrides SGD.step; the update rule is unknown"
    return None


IDENTITY_RULES: dict[str, tuple[str, str, str]] = {
    "adam": ("torch.optim", "Adam", "u = m_hat / (sqrt(v_hat) + eps) (AdamW: decoupled decay; Adam: L2 inside u)"),
    "rmsprop": ("torch.optim", "RMSprop", "u = g / (sqrt(v) + eps) or its momentum buffer (L2 inside u)"),
    "muon": ("torch.optim", "Muon", "u = the Newton-Schulz orthogonalised momentum of each matrix (decoupled decay)"),
    "lion": ("lion_pytorch", "Lion", "u = sign(beta1 m + (1 - beta1) g) (decoupled decay)"),
}
"""Update rules whose u_k the tracker reads from the optimizer's state: rule -> (module, class, what u_k is). A
subclass counts only when it keeps the class's `step` (otherwise its update rule is unknown)."""


def identity_rule(optimizer: torch.optim.Optimizer) -> str | None:
    """The rule of `IDENTITY_RULES` `optimizer` follows, or None.

    Optional packages are looked up in `sys.modules` only: an optimizer of such a package exists only once the
    package has been imported, so nothing is imported here.
    """
    for rule, (module, name, _) in IDENTITY_RULES.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and keeps_step(optimizer, cls):
            return rule
    return None


def decoupled_decay(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> float:
    """lambda of the decoupled decay theta -> (1 - eta lambda) theta the optimizer applies to `group` (0: none or
    coupled). AdamW (Adam with decoupled_weight_decay), Muon and Lion decay decoupled; lion-pytorch's
    `decoupled_weight_decay=True` divides the decay by the initial learning rate."""
    rule = identity_rule(optimizer)
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if rule == "adam":
        return wd if group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)) else 0.0
    if rule == "lion" and getattr(optimizer, "decoupled_wd", False):
        return wd / float(getattr(optimizer, "_init_lr", 1.0))
    return wd if rule in ("muon", "lion") else 0.0


def _identity_applicability(optimizer: torch.optim.Optimizer, rule: str) -> Applicability:
    name = type(optimizer).__name__
    what = IDENTITY_RULES[rule][2]
    return Applicability(
        exact=Verdict(False, f"{name}: {ADAPTIVE_REASON}: there is no symmetry-only prediction (the optimizer's "
                             "own term <D theta_k, u_k> is not fixed by the charge)"),
        breaking=Verdict(True, f"{name}: exact step identity theta_(k+1) = a theta_k - eta u_k (docs/theory.md "
                               f"section 6.1) with {what}, read from the optimizer's state"),
        paper=Verdict(False, f"{name}: the paper's continuous model is derived for SGD (docs/theory.md section 3)"))


def equilibrium(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> Verdict:
    """Whether scale groups of `group` have an equilibrium the theory predicts (docs/theory.md 3.5, 6.3), and why.

    SGD with weight decay (and dampening < 1 with momentum), and decoupled decay (AdamW, Lion, Muon) in the
    noise-dominated regime: yes. Coupled L2 through an adaptive preconditioner (Adam(weight_decay=), RMSprop): no
    closed form, because the decay lambda theta is divided by each coordinate's gradient scale, so the balance
    depends on the gradient statistics of every coordinate. No weight decay: the norm of a scale group only grows.
    """
    name = type(optimizer).__name__
    why_not = _not_sgd(optimizer, group)
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if why_not is None:
        if wd <= 0:
            return Verdict(False, f"{name}: no weight decay, so the norm of a scale group only grows (no equilibrium)")
        if float(group.get("momentum", 0.0)) != 0 and float(group.get("dampening", 0.0)) >= 1:
            return Verdict(False, f"{name}: dampening >= 1 with momentum: the gradient never enters the buffer, "
                                  "so weight decay and gradient do not balance (no equilibrium)")
        return Verdict(True, f"{name}: weight decay balances the gradient's growth (docs/theory.md section 3.5)")
    rule = identity_rule(optimizer)
    if rule is None:
        return Verdict(False, f"{name}: no equilibrium theory for this optimizer's update rule")
    if decoupled_decay(optimizer, group) > 0:
        return Verdict(True, f"{name}: rotational equilibrium of decoupled weight decay, for the noise-dominated "
                             "regime (docs/theory.md section 6.3)")
    if wd > 0:
        return Verdict(False, f"{name}: coupled L2 weight decay passes through the adaptive preconditioner, so the "
                              "balance depends on each coordinate's gradient scale: no closed-form equilibrium "
                              "(docs/theory.md section 6.3)")
    return Verdict(False, f"{name}: no weight decay, so the norm of a scale group only grows (no equilibrium)")


def applicability(optimizer: torch.optim.Optimizer, group: Mapping[str, Any] | None = None) -> Applicability:
    """Which of the three predictions hold for `group` (a param_group of `optimizer`; None: the optimizer alone).

    All three apply to torch.optim.SGD (and subclasses that keep SGD.step) with real floating-point parameters,
    any lr, momentum, Nesterov, weight decay, maximize (handled as B -> -B), foreach or fused kernels (same
    arithmetic) and dampening tau < 1. With momentum and tau >= 1 the exact and breaking recurrences still apply
    but the paper's continuous model does not (its time step h = eta (1 - tau) is not positive). For the rules of
    `IDENTITY_RULES` only `breaking` applies (the exact identity). None applies to other adaptive optimizers,
    LBFGS, Rprop (sign of the gradient), ASGD (hidden internal step-size schedule and averaging), anything
    unknown, complex or sparse-gradient parameters. Without a group only the optimizer's
    class is judged (what the tracker's strategy registry asks).
    """
    why_not = _not_sgd(optimizer, group or {})
    rule = identity_rule(optimizer) if why_not is not None else None
    if why_not is not None and rule is None:
        return Applicability.none(why_not)
    group = group or {}
    for p in group.get("params", ()):
        if p.is_complex():
            return Applicability.none("complex parameters: the charges are defined for real parameters")
        if p.grad is not None and p.grad.is_sparse:
            return Applicability.none("sparse gradients: not supported by the exact recurrences")
    if rule is not None:
        return _identity_applicability(optimizer, rule)
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
