"""The exact step identity for the optimizers people use (AdamW, Adam + L2, RMSprop, Lion, Muon), end to end.

docs/theory.md section 6.1: theta_{k+1} = a theta_k - eta u_k gives C_{k+1} = a^2 C_k - 2 eta a X_k + eta^2 U_k and
T_{k+1} = a T_k - eta Y_k exactly. The tracker reads u_k from the optimizer's state (no copy of the parameters),
so `predicted_breaking`, carried from C_0 with the measured X, U, Y, must equal the measured charge to float
rounding; a wrong decay factor or a wrongly reconstructed update would make it drift. `breaking_term` and the
angle are checked against brute force from two copies of the parameters (what the tracker avoids).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.strategies.lion import Lion
from neural_mechanics.tracking.tracker import Tracker
from scale_invariant_sim import NoiseSphere, run_noise
from test_tracking_helpers import make_data, train

torch.set_num_threads(1)


class ResBNNet(nn.Module):
    """conv-BN-ReLU, a residual block (conv-BN-ReLU-conv-BN + identity), global pool, linear: BN scale groups, the
    residual stream's rescale/translation structure found by the detector."""

    def __init__(self, c: int = 6, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        r = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        return self.fc(torch.relu(h + r).mean(dim=(2, 3)))


def _relative_to_largest(df: pd.DataFrame) -> pd.Series:
    """|predicted_breaking - measured| / the group's largest norm over the run (the issue's yardstick)."""
    return (df["predicted_breaking"] - df["measured"]).abs() / df.groupby("group")["norm"].transform("max")


def _resnet_run(tmp_path, make, dtype, steps=300, log_every=10):
    torch.manual_seed(0)
    net = ResBNNet().to(dtype)
    data = [(x.to(dtype), y) for x, y in make_data()]
    syms = find_symmetries(net, data[0][0])
    opt = make(net.parameters())
    with Tracker(net, opt, syms, tmp_path / "run", log_every=log_every):
        train(net, opt, data, steps)
    return open_run(tmp_path / "run"), syms


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_identity_matches_the_measured_charges_on_a_residual_bn_net(tmp_path, name, dtype, tol):
    """The issue's criterion: 300 steps, every group and logged step within tol of the group's largest charge."""
    run, syms = _resnet_run(tmp_path, OPTIMIZERS[name], dtype)
    df = run.frame()
    assert set(df["kind"]) == {"scale", "rescale", "translation"} and df["valid"].all()
    assert df["step"].max() == 300 and len(df) == 31 * len(syms)
    err = _relative_to_largest(df)
    assert err.max() <= tol, df.loc[err.idxmax(), ["step", "group", "kind"]].to_dict()
    assert df[["predicted_exact", "predicted_paper"]].isna().all().all()


def _brute_force_step(net, opt, data, k):
    """The optimizer term and the angle of step k from two copies of the parameters."""
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    train(net, opt, data, 1, start=k)
    after = {n: p.detach().clone() for n, p in net.named_parameters()}
    return before, after


@pytest.mark.parametrize("name", ["adamw", "adam_l2"])
def test_breaking_term_and_angle_against_brute_force(tmp_path, name):
    torch.manual_seed(0)
    net = ResBNNet().double()
    data = [(x.double(), y) for x, y in make_data()]
    syms = find_symmetries(net, data[0][0])
    opt = OPTIMIZERS[name](net.parameters())
    lr, wd = 1e-2, (0.1 if name == "adamw" else 0.0)
    a = 1 - lr * wd
    with Tracker(net, opt, syms, tmp_path / "run", log_every=7):
        train(net, opt, data, 7)
        before, after = _brute_force_step(net, opt, data, 7)
    row = open_run(tmp_path / "run").frame().query("step == 7").set_index("group")
    for s in syms:
        masks = s.masks(before)
        u = {k: (a * before[k] - after[k]) / lr for k in masks}
        if s.kind == "translation":
            want = sum(float((masks[k] * u[k]).sum()) for k in masks)
        else:
            want = sum(float((masks[k] * before[k] * u[k]).sum()) for k in masks)
        assert row.loc[s.name, "breaking_term"] == pytest.approx(want, rel=1e-9, abs=1e-12), s.name
        if s.kind == "scale":
            w0 = torch.cat([before[k][masks[k].bool()] for k in masks])
            w1 = torch.cat([after[k][masks[k].bool()] for k in masks])
            cos = float(w0 @ w1) / float(w0.norm() * w1.norm())
            sin = float(torch.linalg.vector_norm(w1 / w1.norm() - cos * w0 / w0.norm()))
            angle = math.atan2(sin, cos)
            assert row.loc[s.name, "angular_update"] == pytest.approx(angle, rel=1.01 * 2.0 ** -16), s.name  # figures


MORE = {
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-2),
    "rmsprop_momentum_centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-2, momentum=0.9,
                                                               centered=True),
    "adamw_amsgrad_maximize": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, amsgrad=True, maximize=True),
    "adam_foreach_off": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, foreach=False),
    "lion": lambda p: Lion(p, lr=1e-3, weight_decay=0.1),
    "lion_decoupled": lambda p: Lion(p, lr=1e-3, weight_decay=1e-4, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("name", list(MORE))
def test_identity_for_the_other_update_rules(tmp_path, name):
    """RMSprop (u_k rebuilt from theta_{k+1} without momentum), amsgrad, Lion (at the pre hook): float64, 60 steps."""
    run, _ = _resnet_run(tmp_path, MORE[name], torch.float64, steps=60, log_every=5)
    df = run.frame()
    assert df["valid"].all() and _relative_to_largest(df).max() <= 1e-10


@pytest.mark.parametrize("groups", ["rows", "matrix"])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_identity_for_muon_matrices(tmp_path, groups, nesterov):
    """Muon (bf16 Newton-Schulz): the update recomputed from the momentum buffer is the one applied, bit for bit."""
    model = NoiseSphere([(8, 16), (16, 8)], groups)
    opt = torch.optim.Muon(model.parameters(), lr=2e-2, weight_decay=0.1, nesterov=nesterov,
                           adjust_lr_fn="match_rms_adamw" if nesterov else None)
    with Tracker(model, opt, model.symmetries(), tmp_path / "run", log_every=10):
        run_noise(model, opt, 200)
    df = open_run(tmp_path / "run").frame()
    assert df["valid"].all() and _relative_to_largest(df).max() <= 1e-5   # float32 parameters


def _muon_frame(path, nesterov, steps=30):
    model = NoiseSphere([(8, 16), (16, 8), (6, 6)], "rows")
    opt = torch.optim.Muon(model.parameters(), lr=2e-2, weight_decay=0.1, nesterov=nesterov)
    with Tracker(model, opt, model.symmetries(), path, log_every=1) as tr:
        run_noise(model, opt, steps)
    return open_run(path).frame(), tr


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_muon_reads_the_steps_own_newton_schulz_output_not_a_recomputation(tmp_path, monkeypatch, nesterov):
    """The capture (tracking/strategies/muon_capture.py) and the recomputation from the momentum buffer give the
    same rows bit for bit; with the capture, the strategy runs no Newton-Schulz of its own; afterwards torch's
    function is the original again."""
    import torch.optim._muon as torch_muon

    from neural_mechanics.tracking.strategies import muon, muon_capture

    original = torch_muon._zeropower_via_newtonschulz
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(muon, "_NS", counting)   # the strategy's own recomputations (and the one-off statistics)
    captured, _ = _muon_frame(tmp_path / "capture", nesterov)
    own = len(calls)
    assert torch_muon._zeropower_via_newtonschulz is original
    monkeypatch.setattr(muon_capture, "_MODULE", None)   # no capture: every u_k is recomputed
    calls.clear()
    recomputed, _ = _muon_frame(tmp_path / "recompute", nesterov)
    assert len(calls) >= 3 * 30   # one per matrix per step at least
    assert own <= 3 * 2           # the statistics of the three shapes at most, no per-step recomputation
    pd.testing.assert_frame_equal(captured, recomputed)
    assert captured["valid"].all() and _relative_to_largest(captured).max() <= 1e-5


def test_muon_capture_follows_a_users_own_newton_schulz_and_survives_a_failed_step(tmp_path, monkeypatch):
    """A user's replacement of torch's function is what the step applies, and what the tracker reads (the identity
    holds exactly; the recomputation would use torch's own). A step that raises inside leaves the wrapper behind;
    the next step unwraps it, and closing the tracker restores the user's function."""
    import torch.optim._muon as torch_muon

    original = torch_muon._zeropower_via_newtonschulz
    fail = {"now": False}

    def users(grad, coefficients, steps, eps):
        if fail["now"]:
            raise RuntimeError("boom")
        return original(grad, coefficients, 3, eps)   # three iterations instead of the group's five

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", users)
    model = NoiseSphere([(8, 16), (16, 8)], "matrix")
    opt = torch.optim.Muon(model.parameters(), lr=2e-2, weight_decay=0.1)
    with Tracker(model, opt, model.symmetries(), tmp_path / "run", log_every=1):
        run_noise(model, opt, 20)
        fail["now"] = True
        with pytest.raises(RuntimeError, match="boom"):
            run_noise(model, opt, 1)
        assert torch_muon._zeropower_via_newtonschulz is not users   # the stale wrapper, calling through
        fail["now"] = False
        run_noise(model, opt, 20)
    assert torch_muon._zeropower_via_newtonschulz is users
    df = open_run(tmp_path / "run").frame()
    assert _relative_to_largest(df[df["valid"]]).max() <= 1e-5


def test_muon_capture_is_used_only_when_it_matches_the_step():
    """The capture maps call i to the i-th parameter with a gradient; a call too many or too few, or an output of
    another shape, and nothing is used (the strategy then recomputes); untracked parameters are not kept."""
    import torch.optim._muon as torch_muon

    from neural_mechanics.tracking.strategies.muon_capture import NewtonSchulzCapture

    a, b, c = (nn.Parameter(torch.randn(s)) for s in [(3, 4), (4, 2), (2, 2)])
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt = torch.optim.Muon([a, b, c], lr=1e-2)
    cap = NewtonSchulzCapture(opt, [a, c])

    def run(shapes):
        cap.start()
        for s in shapes:
            torch_muon._zeropower_via_newtonschulz(torch.randn(s), (3.4445, -4.775, 2.0315), 5, 1e-7)
        return cap.finish()

    kept = run([(3, 4), (4, 2), (2, 2)])
    assert set(kept) == {id(a), id(c)} and kept[id(a)].shape == (3, 4)
    assert run([(3, 4), (4, 2)]) == {} and run([(3, 4), (4, 2), (2, 2), (2, 2)]) == {}
    assert run([(4, 3), (4, 2), (2, 2)]) == {}
    original = torch_muon._zeropower_via_newtonschulz
    cap.start()
    cap.discard()
    assert torch_muon._zeropower_via_newtonschulz is original and run([]) == {}


def test_muon_groups_outside_the_optimizer_are_invalid_not_mispredicted(tmp_path):
    """torch's Muon takes only matrices: a scale group that also holds a bias (in another optimizer) is flagged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    syms = find_symmetries(net, x)
    opt = torch.optim.Muon([net[0].weight, net[3].weight], lr=1e-2)
    with Tracker(net, opt, syms, tmp_path / "run", log_every=1) as tr:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    assert any("0.bias" in r and "not in the optimizer" in r for r in tr.invalid.values())
    df = open_run(tmp_path / "run").frame()
    assert df.loc[~df["valid"], "predicted_breaking"].isna().all()


def test_no_parameter_copies_between_the_hooks(tmp_path):
    """Between the pre and the post hook the strategy holds per-group scalars only (the issue: no copies)."""
    torch.manual_seed(0)
    net = ResBNNet()
    data = make_data()
    syms = find_symmetries(net, data[0][0])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    tr = Tracker(net, opt, syms, None, log_every=1)
    held: list[int] = []

    def spy(optimizer, args, kwargs):  # runs after the tracker's pre hook, before the step
        seen: list[torch.Tensor] = []

        def walk(obj, depth=0):
            if isinstance(obj, torch.Tensor):
                seen.append(obj)
            elif depth < 4 and isinstance(obj, dict):
                for v in obj.values():
                    walk(v, depth + 1)
            elif depth < 4 and isinstance(obj, (list, tuple)):
                for v in obj:
                    walk(v, depth + 1)
            elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, torch.optim.Optimizer)):
                walk(vars(obj), depth + 1)

        for ch in tr.strategy.charges:
            walk(vars(ch), 0)
        held.append(max(t.numel() for t in seen))

    opt.register_step_pre_hook(spy)
    train(net, opt, data, 3)
    tr.close()
    n_groups = max(f.n for f in tr.families)
    assert held and max(held) <= n_groups < net.conv1.weight.numel()


# ---- equilibrium on the synthetic scale-invariant objective ----------------------------------------------------
EQUILIBRIUM = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1.0), "rows"),
    "lion": (lambda p: Lion(p, lr=1e-3, weight_decay=10.0), "rows"),
    "muon_rows": (lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=1.0), "rows"),
    "muon_matrix": (lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=1.0), "matrix"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EQUILIBRIUM))
def test_equilibrium_predictions_on_noise_gradients(tmp_path, name):
    """Noise-only gradients of an exactly scale-invariant loss, eta lambda = 1e-2 (relaxation time 100 steps), 1000
    steps: the measured angle and squared norm against the theory (docs/theory.md section 6.3 quotes the long runs,
    benchmarks/equilibrium_laws.py; the tolerances here cover the shorter run's noise and Muon's 3-4 %)."""
    make, groups = EQUILIBRIUM[name]
    model = NoiseSphere([(16, 32), (32, 32)], groups, seed=3)
    opt = make(model.parameters())
    with Tracker(model, opt, model.symmetries(), tmp_path / "run", log_every=5):
        run_noise(model, opt, 1000)
    df = open_run(tmp_path / "run").frame()
    late = df[(df["step"] >= 500) & (df["step"] < 1000)]   # 5 relaxation times in; the row at 1000 has no step
    rms = np.sqrt((late["angular_update"] ** 2).mean() / (late["angular_update_eq"] ** 2).mean())
    assert 0.94 <= rms <= 1.04, rms
    inst = late["predicted_equilibrium"] * late["update_ratio"]   # the instantaneous form: measured |u|^2
    assert 0.9 <= late["measured"].mean() / inst.mean() <= 1.1
    assert np.allclose(late["relaxation_time"], -1 / math.log(1 - 1e-2), rtol=1.01 * 2.0 ** -16)  # precision.py


def test_a_weight_decay_schedule_keeps_the_identity_and_one_table_per_quantity(tmp_path):
    """Scheduled weight decay (changed before every step): the decoupled decay read at each step keeps the exact
    identity, and the per-group table cache holds one table per quantity, not one per value ever seen."""
    torch.manual_seed(0)
    net = ResBNNet().double()
    data = [(x.double(), y) for x, y in make_data()]
    syms = find_symmetries(net, data[0][0])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    with Tracker(net, opt, syms, tmp_path / "run", log_every=5) as tr:
        for k in range(40):
            opt.param_groups[0]["weight_decay"] = 0.1 * (1 + k / 40)
            train(net, opt, data, 1, start=k)
        tables = [len(ch.tables) for ch in tr.strategy.charges]
    df = open_run(tmp_path / "run").frame()
    assert df["valid"].all() and _relative_to_largest(df).max() <= 1e-10
    assert max(tables) <= 5  # decay, and the equilibrium model's applies, p, q, beta
