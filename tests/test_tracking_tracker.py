"""The streaming Tracker end to end: exactness of the predictions, reference agreement, resume, DDP names, Adam."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from neural_mechanics.tracking.metrics import RELATIVE_ERROR_FLOOR, relative_errors
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker
from reference_tracker import ReferenceTracker
from test_tracking_helpers import BNNet, PlainNet, bn_symmetries, make_data, plain_symmetries, train, warmup_cosine

torch.set_num_threads(1)

CONFIGS = {
    "sgd": ({}, {}),
    "sgd_wd": ({"weight_decay": 5e-3}, {}),
    "heavy_ball": ({"momentum": 0.9, "weight_decay": 5e-3}, {}),
    "nesterov": ({"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}, {}),
    "dampening": ({"momentum": 0.9, "dampening": 0.5, "weight_decay": 5e-3}, {}),
    "cosine_warmup": ({"momentum": 0.9, "weight_decay": 5e-3}, {"sched": True}),
    "clipping": ({"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}, {"clip": 0.5, "sched": True}),
}
STEPS = 500


def _rel(df: pd.DataFrame, col: str) -> pd.Series:
    return (df[col] - df["measured"]).abs() / df["norm"].clip(lower=1e-30)


def _run(tmp_path, net, syms, opt_kw, extra, steps=STEPS, dtype=torch.float32, log_every=50, lr=0.05):
    torch.manual_seed(0)
    net = net.to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=lr, **opt_kw)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 50)) if extra.get("sched") else None)
    data = [(x.to(dtype), y) for x, y in make_data()]
    with Tracker(net, opt, syms, tmp_path / "run", log_every=log_every) as tr:
        train(net, opt, data, steps, clip=extra.get("clip"), sched=sched)
    assert tr.closed
    return open_run(tmp_path / "run")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("net_kind", ["bn", "plain"])
def test_predictions_match_float32_training(tmp_path, name, net_kind):
    """500 float32 steps: predicted_breaking tracks the measurement to float32 rounding, exact too (eps = 1e-10).

    The float32 floor: a parameter near 1 (BatchNorm gamma) is rounded to ulp/2 = 6e-8 at every step, which
    random-walks the charge by ~1e-6 over 500 steps; the median error is far below, the max touches it.
    """
    opt_kw, extra = CONFIGS[name]
    torch.manual_seed(0)
    net = BNNet(eps=1e-10) if net_kind == "bn" else PlainNet()
    syms = bn_symmetries(net) if net_kind == "bn" else plain_symmetries(net)
    run = _run(tmp_path, net, syms, opt_kw, extra)
    df = run.frame()
    assert sorted(df["step"].unique()) == list(range(0, STEPS + 1, 50))
    assert len(df) == len(syms) * (STEPS // 50 + 1)
    assert df["valid"].all() and not run.invalid
    eb, ee = _rel(df, "predicted_breaking"), _rel(df, "predicted_exact")
    assert eb.median() <= 1e-6 and eb.max() <= 3e-6, (eb.median(), eb.max())
    assert ee.max() <= 1e-5, ee.max()
    # the charges really moved (the test would catch a tracker that just echoes the measurement)
    first, last = df[df.step == 0].set_index("group"), df[df.step == STEPS].set_index("group")
    assert ((last.measured - first.measured).abs() / first.norm).max() > 1e-2
    layers = run.layers()
    assert set(layers["kind"]) == set(df["kind"]) and (layers["n_valid"] == layers["n_groups"]).all()
    assert (layers["err_breaking_max"] <= 3e-6).all()


def test_default_eps_breaking_is_measured(tmp_path):
    """BatchNorm's eps = 1e-5 breaks scale symmetry: exact drifts, breaking (with measured B) stays at rounding."""
    torch.manual_seed(0)
    net = BNNet(eps=1e-5)
    run = _run(tmp_path, net, bn_symmetries(net), *CONFIGS["nesterov"])
    df = run.frame()
    scale = df[df.kind == "scale"]
    assert _rel(scale, "predicted_exact").max() > 1e-4          # the breaking is real and visible ...
    assert _rel(scale, "predicted_breaking").max() <= 3e-6      # ... and fully attributed to B
    assert (scale["breaking"] - (scale["predicted_breaking"] - scale["predicted_exact"])).abs().max() == 0
    assert scale[scale.step > 0]["breaking_term"].abs().max() > 0


F64_CONFIGS = {**CONFIGS, "onecycle": ({"momentum": 0.9, "weight_decay": 5e-3}, {"onecycle": True})}


@pytest.mark.parametrize("name", ["sgd_wd", "heavy_ball", "nesterov", "dampening", "clipping", "onecycle"])
def test_float64_training_is_exact_and_matches_reference(tmp_path, name):
    """In float64 the recurrence is exact to ~1e-12, and the streaming tracker equals the brute-force one.

    "onecycle": OneCycleLR changes lr and momentum at every step (cycle_momentum), read from the optimizer each step.
    """
    opt_kw, extra = F64_CONFIGS[name]
    torch.manual_seed(0)
    net = BNNet(eps=1e-5).double()
    syms = bn_symmetries(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, **opt_kw)
    ref = ReferenceTracker(net, opt, syms)
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if extra.get("sched"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(60, 10))
    elif extra.get("onecycle"):
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60, base_momentum=0.8,
                                                    max_momentum=0.95)
    data = [(x.double(), y) for x, y in make_data()]
    with Tracker(net, opt, syms, tmp_path / "run", log_every=1):
        train(net, opt, data, 60, clip=extra.get("clip"), sched=sched)
    ref.close()
    df = open_run(tmp_path / "run").frame().set_index(["step", "group"])
    assert _rel(df, "predicted_breaking").max() < 1e-11
    final = ref.final_charges()
    for rec in [*ref.history, None]:
        k = 60 if rec is None else rec["step"]
        rows = df.xs(k, level="step")
        meas = final if rec is None else rec["measured"]
        for s in syms:
            r = rows.loc[s.name]
            scale = max(r["norm"], 1e-12)
            assert abs(r["measured"] - meas[s.name]) / scale < 1e-12
            if rec is not None:
                assert abs(r["predicted_exact"] - rec["exact"][s.name]) / scale < 1e-10
                assert abs(r["predicted_breaking"] - rec["breaking"][s.name]) / scale < 1e-10
                assert abs(r["breaking_term"] - rec["B"][s.name]) <= 1e-10 * max(1.0, abs(rec["B"][s.name]))
                if s.kind == "scale":   # angular update = the angle between theta_k and theta_{k+1}
                    ang = rec["angle"][s.name]
                    assert abs(r["angular_update"] - ang) <= 1.01 * 2.0 ** -16 * ang + 1e-15  # 2^-16: precision.py


def _resume_case(tmp_path, split):
    """Train 200 steps (Nesterov, wd, schedule) straight, or `split` + checkpoint/reload + the rest."""
    total = 200

    def build():
        torch.manual_seed(0)
        net = BNNet(eps=1e-5).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, 20))
        return net, opt, sched

    data = [(x.double(), y) for x, y in make_data()]
    run_dir = tmp_path / f"run{split}"
    net, opt, sched = build()
    syms = bn_symmetries(net)
    if split is None:
        with Tracker(net, opt, syms, run_dir, log_every=10, flush_every=30) as tr:
            train(net, opt, data, total, sched=sched)
        return run_dir
    tr = Tracker(net, opt, syms, run_dir, log_every=10, flush_every=30)
    train(net, opt, data, split, sched=sched)
    ckpt = {"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "tracker": tr.state_dict()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train(net, opt, data, 37, start=split, sched=sched)   # keeps going past the checkpoint, then "dies"
    tr.flush()
    del net, opt, sched, tr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net, opt, sched = build()
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    with Tracker(net, opt, syms, run_dir, log_every=10, flush_every=30) as tr:
        tr.load_state_dict(ckpt["tracker"])
        train(net, opt, data, total - split, start=split, sched=sched)
    return run_dir


@pytest.mark.parametrize("split", [95, 100])
def test_resume_equals_uninterrupted(tmp_path, split):
    a = open_run(_resume_case(tmp_path, None)).frame()
    b_dir = _resume_case(tmp_path, split)
    b = open_run(b_dir).frame()
    assert len(a) == len(b) and list(a["group"]) == list(b["group"]) and list(a["step"]) == list(b["step"])
    for col in ("measured", "predicted_exact", "predicted_breaking", "predicted_paper"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-12, atol=1e-14)
    raw = pd.read_parquet(b_dir / "charges")                 # no duplicates even without open_run's dedupe
    assert not raw.duplicated(["step", "gid"]).any() and len(raw) == len(a)
    assert any("resumed at step" in n for n in open_run(b_dir).manifest["notes"])


class _Wrapper(nn.Module):
    """What DistributedDataParallel looks like to named_parameters(): a `module.` prefix."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_ddp_style_prefixed_names(tmp_path):
    torch.manual_seed(0)
    net = BNNet(eps=1e-5)
    syms = bn_symmetries(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    run_plain = _run(tmp_path / "a", net, syms, *CONFIGS["heavy_ball"], steps=50, log_every=10).frame()
    net2 = BNNet(eps=1e-5)
    net2.load_state_dict(state)
    wrapped = _Wrapper(net2)
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    run_wrapped = _run(tmp_path / "b", wrapped, syms, *CONFIGS["heavy_ball"], steps=50, log_every=10).frame()
    pd.testing.assert_frame_equal(run_plain, run_wrapped)
    # and prefixed symmetry names on an unwrapped model
    net3 = BNNet(eps=1e-5)
    net3.load_state_dict(state)
    run_prefixed = _run(tmp_path / "c", net3, bn_symmetries(net3, prefix="module."), *CONFIGS["heavy_ball"],
                        steps=50, log_every=10).frame()
    np.testing.assert_array_equal(run_prefixed["measured"].to_numpy(), run_plain["measured"].to_numpy())


def test_rank_nonzero_does_not_write(tmp_path):
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with Tracker(net, opt, bn_symmetries(net), tmp_path / "r1", rank=1) as tr:
        train(net, opt, make_data(), 3)
    assert tr.writer is None and not (tmp_path / "r1").exists()


def test_adam_gets_the_identity_and_measures_optimizer_term(tmp_path):
    """Adam: no symmetry-only or paper prediction, the exact identity (predicted_breaking) and the optimizer's term
    <D theta_k, u_k> against brute force (u_k = (theta_k - theta_{k+1}) / eta from two copies of the parameters)."""
    torch.manual_seed(0)
    net = BNNet()
    syms = bn_symmetries(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = make_data()
    with Tracker(net, opt, syms, tmp_path / "run", log_every=5) as tr:
        train(net, opt, data, 5)
        # brute force for step 5: <D theta_5, (theta_5 - theta_6) / eta>
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        train(net, opt, data, 1, start=5)
    run = open_run(tmp_path / "run")
    assert "not_applicable" not in run.manifest and run.manifest["tracker"]["strategy"] == "adam"
    app = run.manifest["applicability"]
    assert app["predicted_breaking"]["applies"] and not app["predicted_exact"]["applies"]
    assert "adaptive preconditioner" in app["predicted_exact"]["reason"]
    assert not app["predicted_paper"]["applies"]
    df = run.frame()
    assert df["valid"].all()
    assert df[["predicted_exact", "predicted_paper"]].isna().all().all()
    assert ((df["predicted_breaking"] - df["measured"]).abs() <= 1e-5 * df["norm"]).all()
    row = df[df.step == 5].set_index("group")
    after = dict(net.named_parameters())
    for s in syms:
        masks = s.masks(before)
        if s.kind == "translation":
            want = sum(float((masks[k] * (before[k] - after[k].detach())).double().sum()) for k in masks) / 1e-2
        else:
            want = sum(float((masks[k] * before[k] * (before[k] - after[k].detach())).double().sum())
                       for k in masks) / 1e-2
        assert abs(row.loc[s.name, "breaking_term"] - want) <= 1e-4 * max(1.0, abs(want)), s.name
    assert tr.closed


def test_missing_grad_and_mixed_hyperparameters_invalidate(tmp_path):
    torch.manual_seed(0)
    net = BNNet()
    syms = bn_symmetries(net)
    net.fc.bias.requires_grad_(False)              # in the optimizer, never gets a gradient
    bn1 = [net.bn1.weight, net.bn1.bias]
    rest = [p for n, p in net.named_parameters() if not n.startswith("bn1.")]
    opt = torch.optim.SGD([{"params": rest}, {"params": bn1, "lr": 0.02}], lr=0.05, momentum=0.9)
    with Tracker(net, opt, syms, tmp_path / "run", log_every=10) as tr:
        train(net, opt, make_data(), 20)
    run = open_run(tmp_path / "run")
    assert "no gradient" in run.invalid["fc.bias"]
    assert all("different lr" in run.invalid[f"bn1.rescale{c}"] for c in range(4))
    df = run.frame()
    bad = df["group"].isin(list(run.invalid))
    assert not df[bad]["valid"].any() and df[bad & (df.step > 0)]["predicted_exact"].isna().all()
    assert df[~bad]["valid"].all() and _rel(df[~bad], "predicted_breaking").max() < 3e-6
    assert set(tr.invalid) == set(run.invalid)


def test_metrics_and_failed_status(tmp_path):
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="boom"), Tracker(net, opt, bn_symmetries(net), tmp_path / "run") as tr:
        train(net, opt, make_data(), 12, on_step=lambda k, loss: tr.log_metrics(k, loss=loss, acc=0.5))
        raise RuntimeError("boom")
    run = open_run(tmp_path / "run")
    assert run.status == "failed" and any("boom" in n for n in run.manifest["notes"])
    m = run.metrics()
    assert len(m) == 24 and set(m["name"]) == {"loss", "acc"} and (m["split"] == "train").all()
    assert run.symmetries.to_json() == bn_symmetries(net).to_json()
    assert run.manifest["hyperparameters"]["optimizer"] == "SGD"
    assert {"torch", "python", "neural_mechanics"} <= set(run.manifest["versions"])


def test_state_dict_is_weights_only_loadable(tmp_path):
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    tr = Tracker(net, opt, bn_symmetries(net))
    train(net, opt, make_data(), 3)
    torch.save(tr.state_dict(), tmp_path / "t.pt")
    sd = torch.load(tmp_path / "t.pt", weights_only=True)
    assert sd["step"] == 3
    tr.close()


PHASES = [  # (steps, param_group settings): plain -> heavy ball -> Nesterov -> plain with the old buffers kept ->
    # heavy ball with dampening (continuing from the old buffers) -> Nesterov
    (8, {"momentum": 0.0, "nesterov": False, "dampening": 0.0}),
    (15, {"momentum": 0.9, "nesterov": False, "dampening": 0.0}),
    (15, {"momentum": 0.9, "nesterov": True, "dampening": 0.0}),
    (10, {"momentum": 0.0, "nesterov": False, "dampening": 0.0}),
    (15, {"momentum": 0.8, "nesterov": False, "dampening": 0.3}),
    (10, {"momentum": 0.9, "nesterov": True, "dampening": 0.0}),
]


@pytest.mark.parametrize("maximize", [False, True])
def test_switching_optimizer_modes_matches_reference(tmp_path, maximize):
    """Heavy ball (measured at the post hook) <-> Nesterov / plain (derived from gg, gb and carried state) mid-run.

    The momentum-0 phase after momentum steps keeps torch's old buffers, which the next momentum step continues
    from: the overlap <D theta, b_old> must follow theta through the plain steps.

    The carried <b, D b> and the switch between the two measurement paths must keep every prediction equal to
    the brute-force reference (float64), with and without maximize (which flips the sign of g in d).
    """
    torch.manual_seed(0)
    net = BNNet(eps=1e-5).double()
    syms = bn_symmetries(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-3, maximize=maximize)
    ref = ReferenceTracker(net, opt, syms)
    data = [(x.double(), y) for x, y in make_data()]
    k = 0
    with Tracker(net, opt, syms, tmp_path / "run", log_every=1) as tr:
        for steps, settings in PHASES:
            for pg in opt.param_groups:
                pg.update(settings)
            train(net, opt, data, steps, start=k)
            k += steps
    ref.close()
    assert tr.step == k
    df = open_run(tmp_path / "run").frame().set_index(["step", "group"])
    assert _rel(df, "predicted_breaking").max() < 1e-11
    for rec in ref.history:
        rows = df.xs(rec["step"], level="step")
        for s in syms:
            r = rows.loc[s.name]
            scale = max(r["norm"], 1e-12)
            assert abs(r["predicted_exact"] - rec["exact"][s.name]) / scale < 1e-10, (rec["step"], s.name)
            assert abs(r["predicted_breaking"] - rec["breaking"][s.name]) / scale < 1e-10, (rec["step"], s.name)


@pytest.mark.parametrize("nesterov", [False, True])
def test_attach_to_optimizer_with_momentum_buffers(tmp_path, nesterov):
    """Attached mid-run (buffers already exist): the first step measures <D theta, b> and <b, D b> once."""
    torch.manual_seed(0)
    net = BNNet(eps=1e-5).double()
    syms = bn_symmetries(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=5e-3)
    data = [(x.double(), y) for x, y in make_data()]
    train(net, opt, data, 10)
    with Tracker(net, opt, syms, tmp_path / "run", log_every=5):
        train(net, opt, data, 40, start=10)
    df = open_run(tmp_path / "run").frame()
    assert _rel(df, "predicted_breaking").max() < 1e-11
    first, last = df[df.step == 0].set_index("group"), df[df.step == 40].set_index("group")
    assert ((last.measured - first.measured).abs() / first.norm).max() > 1e-3


def test_layers_errors_use_the_shared_floor(tmp_path):
    """err_* of the layers frame = per (step, layer, kind) max / median of `relative_errors` on the groups frame,
    whose denominator is max(norm, RELATIVE_ERROR_FLOOR x the group's largest norm so far) (brute force here)."""
    torch.manual_seed(0)
    net = BNNet(eps=1e-5)
    run = _run(tmp_path, net, bn_symmetries(net), *CONFIGS["heavy_ball"], steps=60, log_every=10)
    df = run.frame()
    err = relative_errors(df)
    for _name, g in df.groupby("group"):
        g = g.sort_values("step")
        running = np.maximum.accumulate(g["norm"].abs().to_numpy())
        den = np.maximum(g["norm"].abs().to_numpy(), RELATIVE_ERROR_FLOOR * running)
        want = (g["predicted_breaking"] - g["measured"]).abs().to_numpy() / den
        np.testing.assert_allclose(err.loc[g.index, "err_breaking"].to_numpy(), want, rtol=1e-12, atol=0)
    valid = err[err["valid"]]
    agg = valid.groupby(["step", "layer", "kind"])["err_breaking"].max()
    layers = run.layers().set_index(["step", "layer", "kind"])
    np.testing.assert_allclose(layers.loc[agg.index, "err_breaking_max"].to_numpy(), agg.to_numpy(), rtol=1e-12)
    # a dead group: its norm collapsing by 1e10 is compared against a millionth of its own largest norm
    dead = pd.DataFrame({"step": [0, 10, 20], "group": ["d"] * 3, "measured": [1.0, 1e-8, 1e-12],
                         "predicted_breaking": [1.0, 2e-8, 3e-12], "norm": [1.0, 1e-8, 1e-12]})
    np.testing.assert_allclose(relative_errors(dead)["err_breaking"].to_numpy(), [0.0, 1e-8 / 1e-6, 2e-12 / 1e-6])


def test_hooks_run_single_threaded_and_restore_torch_threads(tmp_path):
    """On CPU the hooks' reductions run with Tracker.hook_threads torch threads; the caller's setting is restored."""
    seen = []
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    tr = Tracker(net, opt, bn_symmetries(net), tmp_path / "run", log_every=2)
    inner = tr._sums
    tr._sums = lambda *a, **k: (seen.append(torch.get_num_threads()), inner(*a, **k))[1]  # type: ignore[method-assign]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(net, opt, make_data(), 3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        tr.close()
    assert seen and set(seen) == {1}
