"""The paper's continuous predictions (theory/continuous.py): closed forms, regimes, convergence, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neural_mechanics.theory.continuous import PaperPrediction, cos_sinc, momentum_propagator
from neural_mechanics.theory.hyper import Hyper
from theory_harness import Config, hyper_at, run_exact, simulate

torch.set_num_threads(1)
F64 = torch.float64


def test_cos_sinc_matches_complex_reference():
    z = torch.cat([torch.linspace(-1.5, 2.5, 401, dtype=F64), torch.logspace(-9, -2, 50, dtype=F64),
                   -torch.logspace(-9, -2, 50, dtype=F64), torch.tensor([0.0, 1e-3, -1e-3], dtype=F64)])
    s = torch.sqrt(z.to(torch.complex128))
    ref_c = torch.cos(s).real
    ref_s = torch.where(z == 0, torch.ones_like(z), (torch.sin(s) / torch.where(z == 0, 1, s)).real)
    c, sn = cos_sinc(z)
    torch.testing.assert_close(c, ref_c, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(sn, ref_s, rtol=1e-14, atol=1e-15)


def test_propagator_wronskian_and_composition():
    """det [[chi, G], [chi', G']] = e^{-2 gamma h} (Liouville), and two half steps compose to one full step."""
    h = torch.tensor([1e-3, 0.01, 0.05, 0.0], dtype=F64)
    beta = torch.tensor([0.9, 0.5, 0.99, 0.9], dtype=F64)
    w2h = torch.tensor([1e-2, 4.0, 0.3, 0.02], dtype=F64)
    chi, G, dchi, dG = momentum_propagator(h, beta, w2h)
    c = (1 - beta) / (1 + beta)
    torch.testing.assert_close(chi * dG - G * dchi, torch.exp(-2 * c), rtol=1e-13, atol=0)
    # two half steps at fixed gamma, omega (so gamma h -> c / 2, omega^2 h -> half) make one step (h > 0 only)
    c2 = c / 2
    beta2 = (1 - c2) / (1 + c2)
    a = momentum_propagator(h / 2, beta2, w2h / 2)
    m_half = torch.stack([torch.stack([a[0], a[1]], -1), torch.stack([a[2], a[3]], -1)], -2)[:3]
    m_full = torch.stack([torch.stack([chi, G], -1), torch.stack([dchi, dG], -1)], -2)[:3]
    torch.testing.assert_close(m_half @ m_half, m_full, rtol=1e-12, atol=1e-14)


def _chi_G(gamma: float, omega2: float):
    """docs/theory.md section 3 closed forms for chi(t), G(t), one regime at a time."""
    if abs(omega2 - gamma**2) < 1e-12 * gamma**2:
        return (lambda t: math.exp(-gamma * t) * (1 + gamma * t)), (lambda t: t * math.exp(-gamma * t))
    if gamma**2 < omega2:
        Om = math.sqrt(omega2 - gamma**2)
        return ((lambda t: math.exp(-gamma * t) * (math.cos(Om * t) + gamma / Om * math.sin(Om * t))),
                (lambda t: math.exp(-gamma * t) * math.sin(Om * t) / Om))
    r = math.sqrt(gamma**2 - omega2)
    ap, am = -gamma + r, -gamma - r
    return ((lambda t: (ap * math.exp(am * t) - am * math.exp(ap * t)) / (ap - am)),
            (lambda t: (math.exp(ap * t) - math.exp(am * t)) / (ap - am)))


@pytest.mark.parametrize("regime", ["over", "critical", "under"])
@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_momentum_online_equals_green_function_sum(regime, tau):
    """Online propagation == S(t) = chi(t) S(0) + sum_k (2 eta / (1 - tau)) G(t - t_k) <b_k, D b_k> (constant lr)."""
    eta, beta = 0.01, 0.9
    h = eta * (1 - tau)
    gamma = (1 - beta) / (h * (1 + beta))
    lam_crit = gamma**2 * h * (1 + beta) / 4
    lam = {"over": lam_crit / 3, "critical": lam_crit, "under": 4 * lam_crit}[regime]
    omega2 = 4 * lam / (h * (1 + beta))
    chi, G = _chi_G(gamma, omega2)
    chiT, _ = _chi_G(gamma, omega2 / 2)
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 2, size=(300, 2))
    v[:, 1] *= -1                                   # a rescale-like group: negative source
    C0 = torch.tensor([1.3, -0.4, 2.0], dtype=F64)
    pred = PaperPrediction(torch.tensor([True, True, False]), C0)
    hp = Hyper(lr=eta, momentum=beta, dampening=tau, weight_decay=lam)
    for k in range(v.shape[0]):
        vk = torch.tensor([v[k, 0], v[k, 1], 123.0], dtype=F64)   # translation ignores its input
        out = pred.step(hp, None, vk)
        t = (k + 1) * h
        ref = [chi(t) * C0[i].item() + sum(2 * eta / (1 - tau) * G(t - j * h) * v[j, i] for j in range(k + 1))
               for i in range(2)]
        ref.append(chiT(t) * C0[2].item())
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert pred.time.tolist() == pytest.approx([300 * h] * 3, rel=1e-12)


def test_sgd_online_equals_closed_form_with_schedule():
    """beta = 0: S(t) = e^{-2 lambda t} S(0) + sum_k eta_k^2 |g_k|^2 e^{-2 lambda (t - t_k)}, T = e^{-lambda t} T(0),
    with t advancing by eta_k (a warmup starting at lr 0, then a cosine)."""
    lam, K = 0.3, 200
    lrs = [0.05 * min(1.0, k / 20) * (0.5 + 0.5 * math.cos(math.pi * k / K)) for k in range(K)]
    g = np.random.default_rng(1).uniform(0, 3, size=K)
    C0 = torch.tensor([2.0, 0.5], dtype=F64)
    pred = PaperPrediction(torch.tensor([True, False]), C0)
    for k in range(K):
        out = pred.step(Hyper(lr=lrs[k], weight_decay=lam), torch.tensor([g[k], 9.0], dtype=F64))
    t = np.cumsum([0.0, *lrs])
    S = math.exp(-2 * lam * t[K]) * 2.0 + sum(lrs[k] ** 2 * g[k] * math.exp(-2 * lam * (t[K] - t[k])) for k in range(K))
    np.testing.assert_allclose(out.numpy(), [S, math.exp(-lam * t[K]) * 0.5], rtol=1e-12)
    assert pred.time[0].item() == pytest.approx(t[K], rel=1e-12)


def test_update_integrand_adds_the_weight_decay_term():
    """integrand="update" integrates |d|^2 = |g|^2 + lambda^2 S: per step an extra factor (1 + eta^2 lambda^2)."""
    eta, lam, K = 0.1, 0.5, 100
    a = PaperPrediction(True, torch.tensor([1.0], dtype=F64))
    b = PaperPrediction(True, torch.tensor([1.0], dtype=F64), integrand="update")
    hp = Hyper(lr=eta, weight_decay=lam)
    for _ in range(K):
        a.step(hp, torch.zeros(1, dtype=F64))
        b.step(hp, torch.zeros(1, dtype=F64))
    assert b.charge.item() == pytest.approx(a.charge.item() * (1 + eta**2 * lam**2) ** K, rel=1e-12)


def test_zero_lr_is_a_no_op_on_the_charge():
    pred = PaperPrediction(True, torch.tensor([1.0, 2.0], dtype=F64))
    hp = Hyper(lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(10):
        pred.step(hp, None, torch.tensor([0.5, 0.1], dtype=F64))
    before, t = pred.charge.clone(), pred.time.clone()
    out = pred.step(Hyper(lr=0.0, momentum=0.9, weight_decay=0.01), None, torch.tensor([0.5, 0.1], dtype=F64))
    torch.testing.assert_close(out, before, rtol=1e-15, atol=0)
    torch.testing.assert_close(pred.time, t, rtol=0, atol=0)


def test_groups_are_independent_and_vectorised():
    """One PaperPrediction over mixed groups (kinds, beta = 0 / heavy ball, different lambda) == one per group."""
    quad = torch.tensor([True, True, False, False])
    beta = torch.tensor([0.0, 0.9, 0.0, 0.9], dtype=F64)
    lam = torch.tensor([1e-2, 1e-3, 1e-2, 1e-3], dtype=F64)
    C0 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    joint = PaperPrediction(quad, C0)
    single = [PaperPrediction(bool(quad[i]), C0[i : i + 1]) for i in range(4)]
    rng = torch.Generator().manual_seed(0)
    for k in range(50):
        lr = 0.1 * (1 + k % 3)
        g, v = torch.rand(4, generator=rng, dtype=F64), torch.rand(4, generator=rng, dtype=F64)
        out = joint.step(Hyper(lr=lr, momentum=beta, weight_decay=lam), g, v)
        for i in range(4):
            o = single[i].step(Hyper(lr=lr, momentum=beta[i], weight_decay=lam[i]), g[i : i + 1], v[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], o, rtol=1e-14, atol=0)


def test_state_dict_roundtrip():
    hp = Hyper(lr=0.1, momentum=0.9, weight_decay=1e-3)
    a = PaperPrediction(True, torch.tensor([1.0, 2.0], dtype=F64))
    for _ in range(5):
        a.step(hp, None, torch.tensor([0.3, 0.2], dtype=F64))
    b = PaperPrediction(False, torch.zeros(2, dtype=F64))
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        torch.testing.assert_close(a.step(hp, None, torch.tensor([0.3, 0.2], dtype=F64)),
                                   b.step(hp, None, torch.tensor([0.3, 0.2], dtype=F64)), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_over_20000_momentum_steps(dtype):
    """beta = 0.9, all three regimes and a schedule through lr = 0: finite, bounded, float32 close to float64."""
    G, K = 6, 20000
    quad = torch.tensor([True, True, True, False, False, True])
    lam = torch.tensor([1e-4, 3e-3, 5e-2, 1e-4, 5e-2, 0.0])
    preds = {dt: PaperPrediction(quad, torch.ones(G, dtype=dt)) for dt in dict.fromkeys((dtype, F64))}
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(K, G, generator=gen, dtype=F64) * 1e-2
    for k in range(K):
        lr = 0.1 * min(1.0, k / 500) * (0.5 + 0.5 * math.cos(math.pi * k / K))
        for dt, p in preds.items():
            p.step(Hyper(lr=lr, momentum=0.9, weight_decay=lam.to(dt)), None, v[k].to(dt))
    out, ref = preds[dtype].charge, preds[F64].charge
    assert torch.isfinite(out).all() and torch.isfinite(preds[dtype].rate).all()
    assert (out.abs() < 1e3).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-4)


# ---- convergence of the paper's model to the exact recurrence as eta -> 0 ------------------------------------

def _paper_run(m, kind, **kw):
    p = PaperPrediction(kind != "translation", m["C"][0], **kw)
    for k in range(m["lr"].shape[0]):
        p.step(hyper_at(m, k), m["gsq"][k] if "gsq" in m else None, m["vsq"][k] if "vsq" in m else None)
    return p.charge


def _errors(beta, tau, lam, T, etas, kinds, relative_to_change=False, **kw):
    errs = {k: [] for k in kinds}
    for eta in etas:
        h = eta * (1 - tau) if beta else eta
        m = simulate(Config(lr=eta, momentum=beta, dampening=tau, weight_decay=lam, full_batch=True,
                            steps=round(T / h), data_n=32))
        for kind in kinds:
            exact = run_exact(m[kind], kind, breaking=False)
            diff = (_paper_run(m[kind], kind, **kw) - exact[-1]).abs()
            denom = (exact[-1] - exact[0]).abs() if relative_to_change else m[kind]["scale"]
            errs[kind].append((diff / denom).max().item())
    return errs


def _slope(etas, errs):
    return float(np.polyfit(np.log(etas), np.log(errs), 1)[0])


def _assert_first_order(beta, lam, T, etas, slope_lo, slope_hi, last_max):
    """Every kind's error vs the exact recurrence falls like eta: log-log slope in (slope_lo, slope_hi), and the
    error at the smallest eta is below last_max."""
    errs = _errors(beta, 0.0, lam, T, etas, ("scale", "rescale", "translation"))
    for kind, e in errs.items():
        assert slope_lo < _slope(etas, e) < slope_hi, (kind, e)
        assert e[-1] < last_max


@pytest.mark.slow
def test_sgd_paper_converges_first_order():
    _assert_first_order(0.0, 0.2, 4.0, [0.04, 0.02, 0.01], 0.85, 1.15, 2e-3)


@pytest.mark.slow
def test_momentum_paper_converges_first_order():
    _assert_first_order(0.9, 0.05, 1.0, [0.004, 0.002, 0.001], 0.8, 1.2, 1e-3)


@pytest.mark.slow
def test_dampening_prefactor_is_2eta_over_1_minus_tau():
    """Without weight decay the whole change of S is the O(eta) source term. With 2 eta / (1 - tau) the paper's
    change converges to the exact one (relative error -> 0 like eta); the reference code's 2 eta (1 - tau) stays off
    by the factor (1 - tau)^2, i.e. a relative error 1 - (1 - tau)^2 = 0.75 at tau = 0.5 for every eta."""
    etas, tau = [0.004, 0.002], 0.5
    derived = _errors(0.9, tau, 0.0, 1.0, etas, ("scale", "rescale"), relative_to_change=True)
    ref = _errors(0.9, tau, 0.0, 1.0, etas, ("scale", "rescale"), relative_to_change=True, prefactor="reference")
    for kind in ("scale", "rescale"):
        assert derived[kind][-1] < 3e-3 and derived[kind][-1] < 0.7 * derived[kind][0], derived
        assert ref[kind] == pytest.approx([1 - (1 - tau) ** 2] * 2, abs=5e-3), ref
