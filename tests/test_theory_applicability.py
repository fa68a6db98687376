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
from neural_mechanics.theory.applicability import PREDICTION_KINDS, applicability, exact_theory_applies
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
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    a = applicability(opt, opt.param_groups[0])
    assert [k for k, _ in a.items()] == list(PREDICTION_KINDS)
    assert not any(v.applies for _, v in a.items()) and len({v.reason for _, v in a.items()}) == 1
    assert "adaptive preconditioner" in a.exact.reason


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
