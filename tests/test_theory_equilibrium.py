"""Equilibrium values (theory/equilibrium.py) against long torch.optim.SGD runs on a scale-invariant toy loss,
and the optimizer classification / Hyper helpers (theory/applicability.py, theory/hyper.py)."""

from __future__ import annotations

import math

import pytest
import torch

from neural_mechanics.theory.applicability import exact_theory_applies, hyper_from_sgd_group
from neural_mechanics.theory.equilibrium import (
    angular_update,
    effective_lr,
    relaxation_steps,
    scale_equilibrium,
    scale_equilibrium_momentum,
)
from neural_mechanics.theory.errors import TheoryError
from neural_mechanics.theory.hyper import Hyper

torch.set_num_threads(1)
F64 = torch.float64


def _noise_run(lr, wd, momentum=0.0, dampening=0.0, steps=3000, burn=1000, n=200, seed=0):
    """SGD on L_k(theta) = <a_k, theta / |theta|> (exactly scale invariant), |a_k| = 1 random each step.

    |g|^2 ~ 1 / S, so theta starts near the equilibrium norm S = sqrt(eta (1 - tau) / (2 lambda (1 - beta)));
    time averages are taken after `burn` steps (the boundary term of the averaged recurrence is ~ dS / (eta N)).
    """
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n, generator=gen, dtype=F64)
    S0 = math.sqrt(lr * (1 - dampening) / (2 * wd * (1 - momentum)))
    theta = torch.nn.Parameter(theta0 / theta0.norm() * math.sqrt(S0))
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd)
    rec = {"C": [], "gsq": [], "vsq": [], "step_sq": [], "sin_sq": []}
    for k in range(steps):
        a = torch.randn(n, generator=gen, dtype=F64)
        a = a / a.norm()
        opt.zero_grad()
        (a @ (theta / theta.norm())).backward()
        before = theta.detach().clone()
        g = theta.grad.detach().clone()
        opt.step()
        if k < burn:
            continue
        after = theta.detach()
        S = before @ before
        cos = (before @ after) / (before.norm() * after.norm())
        rec["C"].append(S)
        rec["gsq"].append(g @ g)
        b = opt.state[theta]["momentum_buffer"] if momentum else g + wd * before
        rec["vsq"].append(b @ b)
        rec["step_sq"].append(((after - before) @ (after - before)) / S)
        rec["sin_sq"].append(1 - cos * cos)
    return {k: torch.stack(v).mean().item() for k, v in rec.items()}


def test_sgd_equilibrium_and_angular_update():
    lr, wd = 0.1, 0.05
    r = _noise_run(lr, wd)
    assert r["C"] == pytest.approx(scale_equilibrium(lr, wd, r["gsq"]).item(), rel=3e-3)
    # the rotation per step: sin(angle)^2 = 2 eta lambda - eta^2 lambda^2, up to the spread of |g|^2 S (|a_k| = 1)
    assert math.sqrt(r["sin_sq"]) == pytest.approx(angular_update(lr, wd).item(), rel=1e-2)


@pytest.mark.parametrize(("beta", "tau"), [(0.9, 0.0), (0.5, 0.4)])
def test_momentum_equilibrium_and_step_size(beta, tau):
    lr, wd = 0.05, 0.02
    r = _noise_run(lr, wd, momentum=beta, dampening=tau, steps=4000, burn=1500)
    assert r["C"] == pytest.approx(scale_equilibrium_momentum(lr, wd, r["vsq"], beta, tau).item(), rel=3e-3)
    assert math.sqrt(r["step_sq"]) == pytest.approx(angular_update(lr, wd, beta, tau).item(), rel=1e-2)


def test_momentum_equilibrium_reduces_to_sgd():
    """At beta = 0, b = d and <d, D d> = <g, D g> + lambda^2 S: both formulas give the same fixed point."""
    lr, wd, g = 0.1, 0.01, 3.0
    S = scale_equilibrium(lr, wd, g)
    torch.testing.assert_close(scale_equilibrium_momentum(lr, wd, g + wd**2 * S, 0.0), S)
    # and the fixed point is one of the exact recurrence
    torch.testing.assert_close((1 - lr * wd) ** 2 * S + lr**2 * g, S)


@pytest.mark.parametrize(("beta", "tau"), [(0.0, 0.0), (0.9, 0.0), (0.9, 0.5)])
def test_relaxation_steps(beta, tau):
    """Zero gradient: the charge decays by about e^-1 per relaxation time (slow mode, after the transient)."""
    lr, wd = 0.01, 0.05
    n = relaxation_steps(lr, wd, beta, tau).item()
    theta = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = torch.optim.SGD([theta], lr=lr, momentum=beta, dampening=tau, weight_decay=wd)
    C = []
    for _ in range(int(3 * n) + 1):
        theta.grad = torch.zeros_like(theta)
        opt.step()
        C.append((theta.detach() @ theta.detach()).item())
    assert C[round(2 * n)] / C[round(n)] == pytest.approx(math.exp(-1), rel=2e-2)


def test_effective_lr():
    torch.testing.assert_close(effective_lr(torch.tensor([0.1, 0.2]), torch.tensor([2.0, 4.0])),
                               torch.tensor([0.05, 0.05], dtype=F64))


# ---- optimizer classification ---------------------------------------------------------------------------------

def _p():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
                                 torch.optim.Adadelta, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam])
def test_adaptive_optimizers_are_refused_with_reason(cls):
    opt = cls(_p())
    ok, why = exact_theory_applies(opt, opt.param_groups[0])
    assert not ok
    assert "adaptive preconditioner breaks the conservation law" in why


@pytest.mark.parametrize("cls", [torch.optim.LBFGS, torch.optim.Rprop, torch.optim.ASGD])
def test_other_optimizers_are_refused(cls):
    opt = cls(_p())
    ok, why = exact_theory_applies(opt, opt.param_groups[0])
    assert not ok and cls.__name__ in why


def test_sgd_applies_and_subclass_with_own_step_does_not():
    for kw in ({}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, {"maximize": True, "foreach": True}):
        opt = torch.optim.SGD(_p(), lr=0.1, **kw)
        ok, why = exact_theory_applies(opt, opt.param_groups[0])
        assert ok, why
        assert ("maximize" in why) == bool(kw.get("maximize"))

    class Mine(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    opt = Mine(_p(), lr=0.1)
    assert not exact_theory_applies(opt, opt.param_groups[0])[0]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], lr=0.1)
    assert not exact_theory_applies(opt, opt.param_groups[0])[0]


def test_hyper_from_groups():
    p1, p2 = _p(), _p()
    opt = torch.optim.SGD([{"params": p1, "lr": torch.tensor(0.3)}, {"params": p2, "momentum": 0.9, "nesterov": True}],
                          lr=0.1, weight_decay=1e-3)
    h = hyper_from_sgd_group(opt.param_groups[1])
    assert (h.lr.item(), h.momentum.item(), h.weight_decay.item(), bool(h.nesterov)) == (0.1, 0.9, 1e-3, True)
    assert h.lr.dtype == F64 and h.lr.ndim == 0
    hp = Hyper.from_param_groups(opt.param_groups, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(hp.lr, torch.tensor([0.1, 0.3, 0.1], dtype=F64))
    assert hp.nesterov.tolist() == [True, False, True]
    assert hp.momentum.tolist() == [0.9, 0.0, 0.9]
    with pytest.raises(TheoryError):
        Hyper.from_sgd_group({"momentum": 0.9})
