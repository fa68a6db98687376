"""The exact recurrences (theory/exact.py) against brute-force torch.optim.SGD runs in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neural_mechanics.theory.exact import (
    LinearRecurrence,
    QuadraticRecurrence,
    plain_linear_step,
    plain_quadratic_step,
    plain_sgd_charge,
)
from neural_mechanics.theory.hyper import Hyper
from theory_harness import Config, hyper_at, rel_err, run_exact, simulate

KINDS = ("scale", "rescale", "translation")
WD = 5e-3
OFF_AND_ON = ((50, 0.0), (110, 0.9))  # momentum 0 from step 50, back to 0.9 from step 110

CONFIGS = {
    "plain": Config(),
    "weight_decay": Config(weight_decay=WD),
    "heavy_ball": Config(momentum=0.9, weight_decay=WD),
    "nesterov": Config(momentum=0.9, nesterov=True, weight_decay=WD),
    "dampening": Config(momentum=0.9, dampening=0.5, weight_decay=WD),
    "momentum0_with_dampening": Config(momentum=0.0, dampening=0.5, weight_decay=WD),
    "cosine_warmup": Config(momentum=0.9, weight_decay=WD, schedule="cosine_warmup"),
    "clip_accum": Config(momentum=0.9, nesterov=True, weight_decay=WD, clip=0.3, accum=3),
    # momentum 0 after momentum steps: torch keeps the old buffer and the next momentum step continues from it
    "momentum_off_and_on": Config(momentum=0.9, weight_decay=WD, momentum_phases=OFF_AND_ON),
    "nesterov_off_and_on": Config(momentum=0.9, nesterov=True, weight_decay=WD, momentum_phases=OFF_AND_ON),
    "onecycle": Config(momentum=0.9, weight_decay=WD, schedule="onecycle"),
    "mixed_param_groups": Config(momentum=0.9, nesterov=True, weight_decay=WD, split_groups=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_symmetry_only_recurrence_matches_torch_sgd(name):
    m = simulate(CONFIGS[name])
    for kind in KINDS:
        err = rel_err(run_exact(m[kind], kind, breaking=False), m[kind])
        assert err < 1e-10, (name, kind, err)
        # the measured charge really moved (otherwise the test proves nothing); T is conserved without decay
        if kind != "translation" or CONFIGS[name].weight_decay:
            assert (m[kind]["C"][-1] - m[kind]["C"][0]).abs().max() / m[kind]["scale"].max() > 1e-4


@pytest.mark.parametrize("cfg", [Config(momentum=0.9, weight_decay=WD, eps=1e-2),
                                 Config(momentum=0.9, nesterov=True, weight_decay=WD, l1=1e-3),
                                 Config(weight_decay=WD, l1=1e-3, eps=1e-2, schedule="cosine_warmup", clip=0.3),
                                 Config(momentum=0.8, dampening=0.3, weight_decay=WD, l1=1e-3, maximize=True, lr=0.01)],
                         ids=["bn_eps", "l1_nesterov", "sgd_all", "maximize_dampening"])
def test_breaking_term_closes_the_gap(cfg):
    m = simulate(cfg)
    broken = 0
    for kind in KINDS:
        sym = rel_err(run_exact(m[kind], kind, breaking=False), m[kind])
        brk = rel_err(run_exact(m[kind], kind, breaking=True), m[kind])
        assert brk < 1e-10, (kind, brk)
        broken += sym > 1e-6
    assert broken >= 1  # the symmetry-only prediction does see the breaking


def test_maximize_sign_matters():
    """With maximize=True the breaking term enters with the opposite sign; the wrong sign is visibly wrong."""
    m = simulate(Config(momentum=0.9, weight_decay=WD, l1=1e-3, maximize=True, lr=0.01))["translation"]
    flipped = dict(m, maximize=~m["maximize"])
    assert rel_err(run_exact(m, "translation", breaking=True), m) < 1e-10
    assert rel_err(run_exact(flipped, "translation", breaking=True), m) > 1e-6


def test_attach_to_optimizer_with_existing_buffers():
    """Starting mid-run needs the buffer overlap <D theta_0, b_{-1}>; without it the first step is wrong."""
    m = simulate(Config(momentum=0.9, weight_decay=WD, steps=60), start_at=25)
    for kind in KINDS:
        good = run_exact(m[kind], kind, breaking=False, overlap0=m[kind]["overlap0"])
        assert rel_err(good, m[kind]) < 1e-10
        assert rel_err(run_exact(m[kind], kind, breaking=False), m[kind]) > 1e-8


def test_plain_closed_forms_agree():
    m = simulate(Config(weight_decay=WD, l1=1e-3, schedule="cosine_warmup"))
    for kind in ("scale", "rescale"):
        q = m[kind]
        C = q["C"][0]
        for k in range(q["lr"].shape[0]):
            C = plain_quadratic_step(C, q["lr"][k], q["weight_decay"][k], q["gsq"][k], q["B"][k])
        assert ((C - q["C"][-1]).abs() / q["scale"]).max() < 1e-10
    exact = simulate(Config(weight_decay=WD, schedule="cosine_warmup"))  # unbroken: symmetry-only forms agree
    for kind in ("scale", "rescale"):
        q = exact[kind]
        C_sym = q["C"][0]
        for k in range(q["lr"].shape[0]):
            C_sym = plain_quadratic_step(C_sym, q["lr"][k], q["weight_decay"][k], q["gsq"][k])
        rec = run_exact(q, kind, breaking=False)[-1]
        assert ((C_sym - rec).abs() / q["scale"]).max() < 1e-12
        assert ((C_sym - q["C"][-1]).abs() / q["scale"]).max() < 1e-10
    t = m["translation"]
    T = t["C"][0]
    for k in range(t["lr"].shape[0]):
        T = plain_linear_step(T, t["lr"][k], t["weight_decay"][k], t["B"][k])
    assert ((T - t["C"][-1]).abs() / t["scale"]).max() < 1e-10


def test_plain_sgd_charge_closed_form():
    m = simulate(Config(weight_decay=0.05, schedule="cosine_warmup"))["scale"]
    closed = plain_sgd_charge(m["C"][0], m["lr"], 0.05, m["gsq"])
    assert ((closed - m["C"][-1]).abs() / m["scale"]).max() < 1e-10


def test_state_dict_resume_equals_uninterrupted():
    m = simulate(Config(momentum=0.9, nesterov=True, weight_decay=WD, steps=40))
    q = m["scale"]
    full = run_exact(q, "scale", breaking=True)
    rec = QuadraticRecurrence(q["C"][0])
    lin = LinearRecurrence(m["translation"]["C"][0])
    for k in range(20):
        rec.step(hyper_at(q, k), q["U"][k], q["V"][k], q["B"][k])
        lin.step(hyper_at(m["translation"], k))
    sd, sdl = rec.state_dict(), lin.state_dict()
    rec2, lin2 = QuadraticRecurrence(torch.zeros(6)), LinearRecurrence(torch.zeros(7))
    rec2.load_state_dict(sd)
    lin2.load_state_dict(sdl)
    for k in range(20, 40):
        out = rec2.step(hyper_at(q, k), q["U"][k], q["V"][k], q["B"][k])
        lin2.step(hyper_at(m["translation"], k))
    torch.testing.assert_close(out, full[-1], rtol=0, atol=0)
    assert rel_err(torch.cat([m["translation"]["C"][:-1], lin2.charge[None]]), m["translation"]) < 1e-10


def test_floats_and_scalars_broadcast():
    """Hyper fields may be plain numbers; results equal the tensor version."""
    C0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    U = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    a, b = QuadraticRecurrence(C0), QuadraticRecurrence(C0)
    hp_f = Hyper(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    f64 = torch.float64
    hp_t = Hyper(lr=torch.full((3,), 0.1, dtype=f64), momentum=torch.full((3,), 0.9, dtype=f64),
                 dampening=torch.zeros(3, dtype=f64), weight_decay=torch.full((3,), 1e-3, dtype=f64),
                 nesterov=torch.ones(3, dtype=torch.bool), maximize=torch.zeros(3, dtype=torch.bool))
    for _ in range(3):
        torch.testing.assert_close(a.step(hp_f, U, U * 0.5), b.step(hp_t, U, U * 0.5), rtol=0, atol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lr=st.floats(1e-3, 0.2), beta=st.sampled_from([0.0, 0.5, 0.9, 0.99]), tau=st.sampled_from([0.0, 0.3, 0.9]),
       lam=st.sampled_from([0.0, 1e-4, 1e-2, 0.1]), nesterov=st.booleans(), l1=st.sampled_from([0.0, 1e-3]),
       seed=st.integers(0, 1000))
def test_random_hyperparameters_match_brute_force(lr, beta, tau, lam, nesterov, l1, seed):
    nesterov = nesterov and beta > 0
    tau = 0.0 if nesterov else tau
    cfg = Config(lr=lr, momentum=beta, dampening=tau, weight_decay=lam, nesterov=nesterov, l1=l1, steps=30,
                 seed=seed)
    m = simulate(cfg)
    for kind in KINDS:
        assert rel_err(run_exact(m[kind], kind, breaking=True), m[kind]) < 1e-10
        if l1 == 0.0:
            assert rel_err(run_exact(m[kind], kind, breaking=False), m[kind]) < 1e-10


def test_steps_need_no_host_synchronisation():
    """On the meta device any .item() / bool(tensor) / data-dependent branch would raise: the steps have none."""
    from neural_mechanics.theory.continuous import PaperPrediction

    meta = torch.device("meta")
    G = 5
    z = torch.zeros(G, dtype=torch.float64, device=meta)
    hp = Hyper(lr=z + 0.1, momentum=z + 0.9, dampening=z, weight_decay=z + 1e-3,
               nesterov=torch.zeros(G, dtype=torch.bool, device=meta), maximize=torch.zeros(G, dtype=torch.bool,
                                                                                            device=meta))
    q, lin = QuadraticRecurrence(z), LinearRecurrence(z)
    paper = PaperPrediction(torch.ones(G, dtype=torch.bool, device=meta), z)
    for _ in range(2):
        out = [q.step(hp, z, z, z), lin.step(hp, z), paper.step(hp, z, z), paper.step(Hyper(lr=0.1), z, z)]
    assert all(o.device == meta and o.shape == (G,) for o in out)
    assert q.state_dict()["charge"].device == meta
