"""theory/applicability.py: the one decision of which prediction applies, per param group, with its reason.

The dampening = 1 case is the one the two former sources disagreed on: torch.optim.SGD accepts it, the exact
recurrence follows it (b_k = beta b_{k-1}: the buffer keeps its first value), the paper's continuous model does not
(its time step h = eta (1 - tau) is 0). The recurrence half of the claim is checked against brute force in
tests/test_tracking_strategies.py; here the verdicts and the algebra.
"""

from __future__ import annotations

import pytest
import torch

from neural_mechanics.errors import NMechError
from neural_mechanics.theory.applicability import (
    PREDICTION_KINDS,
    applicability,
    equilibrium,
    exact_theory_applies,
    identity_rule,
    keeps_step,
)
from neural_mechanics.theory.continuous import PaperPrediction
from neural_mechanics.theory.errors import TheoryError
from neural_mechanics.theory.exact import QuadraticRecurrence
from neural_mechanics.theory.hyper import Hyper


def _sgd(**kw):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, **kw)


@pytest.mark.parametrize(("tau", "word"), [(1.0, "zero"), (1.5, "negative")])
def test_dampening_one_or_more_keeps_the_recurrences_and_drops_the_paper_model(tau, word):
    opt = _sgd(momentum=0.9, dampening=tau)
    a = applicability(opt, opt.param_groups[0])
    assert a.exact.applies and a.breaking.applies and not a.paper.applies
    assert f"h = eta (1 - dampening), here {word}" in a.paper.reason
    assert "exact recurrences still apply" in a.paper.reason
    assert exact_theory_applies(opt, opt.param_groups[0]) == (True, a.exact.reason)


def test_dampening_is_ignored_without_momentum_and_below_one():
    for kw in ({"momentum": 0.0, "dampening": 1.0}, {"momentum": 0.9, "dampening": 0.999}, {"momentum": 0.9}):
        opt = _sgd(**kw)
        a = applicability(opt, opt.param_groups[0])
        assert all(v.applies for _, v in a.items()), kw


def test_paper_model_is_undefined_at_dampening_one_while_the_recurrence_follows_torch():
    """What the verdict rests on: at tau = 1 the paper's step has h = 0 and an infinite kick (its prediction is not a
    number), while the exact recurrence equals torch's own arithmetic on a single scale group."""
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.1, momentum=0.9, dampening=1.0, weight_decay=0.01)
    hp = Hyper(lr=0.1, momentum=0.9, dampening=1.0, weight_decay=0.01)
    C0 = theta.detach().pow(2).sum().reshape(1)
    rec, paper = QuadraticRecurrence(C0), PaperPrediction(True, C0)
    for _ in range(20):
        g = torch.randn(5, dtype=torch.float64)
        theta.grad = g - (g @ theta.detach()) / (theta.detach() @ theta.detach()) * theta.detach()  # <theta, g> = 0
        before = theta.detach().clone()
        buf = opt.state.get(theta, {}).get("momentum_buffer")
        buf = None if buf is None else buf.clone()
        opt.step()
        u = (before - theta.detach()) / 0.1
        b = opt.state[theta]["momentum_buffer"]
        rec.step(hp, (u @ u).reshape(1), (u @ b).reshape(1))
        paper.step(hp, velocity_sq=(b @ b).reshape(1))
        if buf is not None:  # tau = 1: the buffer only decays, the new gradient never enters it
            torch.testing.assert_close(b, 0.9 * buf)
    assert abs(float(rec.charge) - float(theta.detach().pow(2).sum())) < 1e-12 * float(C0)
    assert not torch.isfinite(paper.charge).all()


def test_other_optimizers_get_one_reason_for_all_three_predictions():
    opt = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))])
    a = applicability(opt, opt.param_groups[0])
    assert [k for k, _ in a.items()] == list(PREDICTION_KINDS)
    assert not any(v.applies for _, v in a.items()) and len({v.reason for _, v in a.items()}) == 1
    assert "adaptive preconditioner" in a.exact.reason


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_optimizers_with_a_readable_update_get_the_identity_only(cls):
    """Adam, AdamW, RMSprop (and Lion, Muon): the exact step identity applies, no symmetry-only or paper model."""
    opt = cls([torch.nn.Parameter(torch.zeros(2))])
    a = applicability(opt, opt.param_groups[0])
    assert a.breaking.applies and "exact step identity" in a.breaking.reason
    assert not a.exact.applies and "adaptive preconditioner" in a.exact.reason
    assert not a.paper.applies and "derived for SGD" in a.paper.reason


@pytest.mark.parametrize(("make", "applies", "words"), [
    (lambda p: torch.optim.AdamW(p, weight_decay=0.1), True, "rotational equilibrium"),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1), False, "coupled L2"),
    (lambda p: torch.optim.RMSprop(p, weight_decay=0.1), False, "coupled L2"),
    (lambda p: torch.optim.AdamW(p, weight_decay=0.0), False, "no weight decay"),
    (lambda p: torch.optim.Muon(p, weight_decay=0.1), True, "rotational equilibrium"),
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3), True, "balances"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=1.0, weight_decay=1e-3), False, "dampening"),
    (lambda p: torch.optim.Adagrad(p, weight_decay=0.1), False, "no equilibrium theory"),
], ids=["adamw", "adam_l2", "rmsprop", "adamw_no_wd", "muon", "sgd", "sgd_dampening_one", "adagrad"])
def test_equilibrium_verdict_says_why(make, applies, words):
    opt = make([torch.nn.Parameter(torch.zeros(2, 2))])
    v = equilibrium(opt, opt.param_groups[0])
    assert v.applies == applies and words in v.reason


def test_a_subclass_created_before_its_base_still_keeps_the_base_step():
    """torch wraps `step` in a profiling hook on the class of the first instance: an AdamW built before any Adam
    carries its own wrapper around Adam.step, which is still Adam's update rule."""

    class Fresh(torch.optim.Adam):
        pass

    opt = Fresh([torch.nn.Parameter(torch.zeros(2))])
    assert Fresh.step is not torch.optim.Adam.step or "step" not in Fresh.__dict__
    assert keeps_step(opt, torch.optim.Adam) and identity_rule(opt) == "adam"


def test_without_a_group_only_the_class_is_judged():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], lr=0.1)
    assert applicability(opt).exact.applies                       # the class: torch.optim.SGD
    assert not applicability(opt, opt.param_groups[0]).exact.applies  # the group: complex parameters

    class Own(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    assert "overrides SGD.step" in applicability(Own([torch.nn.Parameter(torch.zeros(2))], lr=0.1)).paper.reason


def test_theory_raises_its_own_error():
    with pytest.raises(TheoryError, match="unknown prefactor"):
        PaperPrediction(True, torch.ones(1), prefactor="other")  # type: ignore[arg-type]
    with pytest.raises(TheoryError, match="no 'lr'"):
        Hyper.from_sgd_group({})
    assert issubclass(TheoryError, NMechError)
