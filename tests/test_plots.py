"""The plotters: run normalisation, the numbers each figure draws, and the toy geometry.

Every drawn quantity is checked against a direct recomputation from the frames (or, for the toy
losses, against finite differences and the conservation law itself), not just "a figure came back".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from neural_mechanics.plots import figures as F
from neural_mechanics.plots import toy
from neural_mechanics.plots.source import FigureUnavailable, RunView, group_errors, load_run, relative_error
from neural_mechanics.plots.style import close, save
from neural_mechanics.theory import equilibrium as eq
from synthetic_runs import synthetic_run

SMALL_LAYERS = (("f.0", "scale", 4, 10), ("f.1", "rescale", 4, 2 + 8), ("f.3", "scale", 5, 9),
                ("c.0", "translation", 6, 4))


@pytest.fixture(scope="module")
def run():
    return synthetic_run(steps=60, layers=SMALL_LAYERS, weight_decay=2e-2)


@pytest.fixture(scope="module")
def momentum_run():
    return synthetic_run(steps=60, layers=SMALL_LAYERS, weight_decay=2e-2, momentum=0.9, seed=3)


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


class OnlyFrame:
    """The least a live object may offer: .frame()."""

    def __init__(self, df):
        self._df = df

    def frame(self):
        return self._df


def test_prediction_error_of_a_run_whose_predictions_are_exact_everywhere_is_a_note_not_a_crash(run):
    # e.g. a run of a few steps logged only where every prediction starts from the measured charge
    df = run.frame()[["step", "group", "kind", "layer", "measured"]].copy()
    df["predicted_exact"] = df["measured"]
    with pytest.raises(FigureUnavailable, match="equals the measured charge at every logged step"):
        F.fig_prediction_error(OnlyFrame(df))


# ---- source ---------------------------------------------------------------------------------------
def test_load_run_accepts_minimal_object_and_fills_missing_columns(run):
    df = run.frame()[["step", "group", "kind", "layer", "measured", "predicted_exact"]].copy()
    df["valid"] = df["group"] != df["group"].iloc[0]
    view = load_run(OnlyFrame(df))
    assert view.layers.empty and view.metrics.empty and view.manifest == {}
    assert view.groups["predicted_paper"].isna().all()  # absent prediction -> NaN column
    first = view.groups["group"] == df["group"].iloc[0]
    assert view.groups.loc[first, "predicted_exact"].isna().all()  # invalid rows blanked
    assert np.array_equal(view.groups.loc[~first, "predicted_exact"], df.loc[~first, "predicted_exact"])
    assert load_run(view) is view
    with pytest.raises(TypeError, match="frame"):
        load_run(object())


def test_load_run_missing_directory_is_a_user_error(tmp_path):
    from neural_mechanics.errors import RunStoreError

    with pytest.raises(RunStoreError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_hyper_lifts_first_param_group_and_flags_differences():
    view = RunView(groups=pd.DataFrame(), manifest={"hyperparameters": {
        "optimizer": "SGD", "param_groups": [{"lr": 0.1, "weight_decay": 5e-4, "n_params": 3},
                                             {"lr": 0.1, "weight_decay": 0.0, "n_params": 2}]}})
    h = view.hyper
    assert h["optimizer"] == "SGD" and h["lr"] == 0.1 and h["weight_decay"] == 5e-4 and h["param_groups"] == 2
    assert h["differs across param groups"] == "weight_decay"
    assert "n_params" not in h
    assert view.hyper_value("weight_decay") == 5e-4 and view.hyper_value("missing", 7.0) == 7.0


def test_group_errors_match_brute_force_both_denominators(run):
    g = run.frame()
    with_norm = group_errors(g)
    biggest = g.groupby("group")["norm"].max()
    for (_, row), e in zip(g.iloc[::37].iterrows(), with_norm["err_exact"].iloc[::37], strict=True):
        denom = max(abs(row["norm"]), 1e-6 * biggest[row["group"]])
        assert e == pytest.approx(abs(row["predicted_exact"] - row["measured"]) / denom, rel=1e-12)
    # a group decaying to nothing: the floor (1e-6 of its largest norm) bounds its relative error
    dead = pd.DataFrame({"step": [0, 1], "group": "d", "kind": "scale", "measured": [1.0, 1e-25],
                         "norm": [1.0, 1e-25], "predicted_exact": [1.0, 1e-20]})
    assert group_errors(dead)["err_exact"].iloc[1] == pytest.approx((1e-20 - 1e-25) / 1e-6)
    no_norm = group_errors(g.drop(columns=["norm"]), floor=1e-3)
    for name, part in g.groupby("group"):
        scale = 1e-3 * part["measured"].abs().max()
        expect = (part["predicted_paper"] - part["measured"]).abs() / np.maximum(part["measured"].abs(), scale)
        assert np.allclose(no_norm.loc[part.index, "err_paper"], expect, rtol=1e-12), name


def test_relative_error_zero_over_zero_is_zero_and_nan_propagates():
    err = relative_error(np.array([0.0, 1.0, 2.0]), np.array([0.0, np.nan, 1.0]))
    assert err[0] == 0 and np.isnan(err[1]) and err[2] == 0.5


# ---- figures ----------------------------------------------------------------------------------------
def _lines_y(ax):
    return [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]


def test_error_table_matches_direct_computation(run):
    table = F.error_table(run)
    g = run.frame()
    last = g[g["step"] == g["step"].max()]
    for kind, part in last.groupby("kind"):
        e = (part["predicted_breaking"] - part["measured"]).abs() / part["norm"].abs()
        assert table.loc[kind, "exact + measured breaking max"] == pytest.approx(e.max(), rel=1e-12)
        assert table.loc[kind, "exact + measured breaking median"] == pytest.approx(e.median(), rel=1e-12)
        assert table.loc[kind, "groups"] == part["group"].nunique()
    assert list(table.index) == ["translation", "scale", "rescale"]


def test_fig_charges_draws_measured_and_predictions_of_sampled_groups(run, momentum_run):
    fig = F.fig_charges({"sgd": run, "momentum": momentum_run}, n_groups=3)
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 6  # 2 runs x 3 kinds
    g = run.frame()
    for ax, kind in zip(axes[:3], ["translation", "scale", "rescale"], strict=True):
        ys = _lines_y(ax)
        assert len(ys) == 3 * 3  # 3 groups x (measured, exact, paper)
        part = g[g["kind"] == kind]
        for i in range(3):
            measured, exact, paper = ys[3 * i: 3 * i + 3]
            match = [name for name, s in part.groupby("group") if np.array_equal(s.sort_values("step")["measured"],
                                                                                 measured)]
            assert len(match) == 1
            s = part[part["group"] == match[0]].sort_values("step")
            assert np.array_equal(exact, s["predicted_exact"]) and np.array_equal(paper, s["predicted_paper"])
        assert ax.get_xlabel() == "step" and ax.get_ylabel()


def test_fig_prediction_error_median_line_is_median_over_groups(run):
    fig = F.fig_prediction_error(run, predictions=("predicted_exact",))
    axes = fig.axes[:3]
    g = run.frame()
    for ax, kind in zip(axes, ["translation", "scale", "rescale"], strict=True):
        median_line, max_line = ax.get_lines()[:2]
        part = g[g["kind"] == kind]
        err = ((part["predicted_exact"] - part["measured"]).abs() / part["norm"].abs()).groupby(part["step"])
        med, top = err.median(), err.max()
        assert np.allclose(median_line.get_ydata(), med.where(med > 0), equal_nan=True)
        assert np.allclose(max_line.get_ydata(), top.where(top > 0), equal_nan=True)
        assert ax.get_yscale() == "log"


def test_fig_norm_dynamics_with_and_without_parameter_traces(run):
    fig = F.fig_norm_dynamics(run)  # the synthetic run carries .param_trace
    assert fig.axes[0].get_title().startswith("per parameter") and fig.axes[1].get_yscale() == "log"
    trace = run.param_trace
    first = trace[trace["param"] == trace["param"].iloc[0]].sort_values("step")
    assert np.allclose(_lines_y(fig.axes[0])[0], first["value"] ** 2)
    view = load_run(run)
    view.extras.pop("param_trace")
    fig2 = F.fig_norm_dynamics(view)
    assert "per-parameter traces not recorded" in fig2.get_suptitle()
    scale = run.frame()[run.frame()["kind"] == "scale"]
    assert len(_lines_y(fig2.axes[0])) == scale["group"].nunique()  # 9 <= 12 per layer: all drawn


def test_equilibrium_formulas_agree_with_theory_module():
    """The gradient form of S_eq the equilibrium figure draws (theory.equilibrium, the only place it is defined)
    reduces to the plain-SGD fixed point and, with momentum, to the buffer form under uncorrelated gradients."""
    lr, wd, g2 = 0.1, 5e-3, 0.37
    assert float(eq.scale_equilibrium_from_grad(lr, wd, g2)) == pytest.approx(float(eq.scale_equilibrium(lr, wd, g2)),
                                                                              rel=1e-14)
    beta, tau = 0.9, 0.2
    # E|b|^2 = (1 - tau)^2 |g|^2 / (1 - beta^2) for uncorrelated minibatch gradients
    b2 = (1 - tau) ** 2 * g2 / (1 - beta**2)
    assert float(eq.scale_equilibrium_from_grad(lr, wd, g2, beta, tau)) == pytest.approx(
        float(eq.scale_equilibrium_momentum(lr, wd, b2, beta, tau)), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_equilibrium_norm_matches_simulated_scale_invariant_sgd(beta):
    """Heavy-ball SGD with weight decay on a group whose gradient is orthogonal to theta with |g| = sigma:
    the time-averaged |theta|^2 and squared angular update settle at the plotted equilibrium values."""
    rng = np.random.default_rng(0)
    n, lr, wd, sigma, steps = 64, 0.05, 0.02, 1.0, 12000
    theta = rng.standard_normal(n)
    buf = np.zeros(n)
    s_hist, ang_hist = [], []
    for k in range(steps):
        g = rng.standard_normal(n)
        g -= (g @ theta) / (theta @ theta) * theta
        g *= sigma / np.linalg.norm(g)
        d = g + wd * theta
        buf = d if k == 0 else beta * buf + d
        step = lr * (buf if beta else d)
        if k > steps // 3:
            s_hist.append(theta @ theta)
            ang_hist.append((step @ step) / (theta @ theta))
        theta = theta - step
    assert np.mean(s_hist) == pytest.approx(float(eq.scale_equilibrium_from_grad(lr, wd, sigma**2, beta)), rel=0.05)
    assert np.sqrt(np.mean(ang_hist)) == pytest.approx(float(eq.angular_update(lr, wd, beta)), rel=0.05)


def test_fig_equilibrium_overlays_s_eq_from_grad_norms(run):
    fig = F.fig_equilibrium(run, smooth=1)
    ax_s = fig.axes[0]
    series = F.scale_layer_series(load_run(run))
    layer = "f.0"
    s = series[series["layer"] == layer].sort_values("step")
    g = run.frame()
    part = g[(g["kind"] == "scale") & (g["layer"] == layer)]
    direct_s = part.groupby("step")["measured"].sum()
    direct_g2 = (part["grad_norm"] ** 2).groupby(part["step"]).sum()
    assert np.allclose(s["S"], direct_s) and np.allclose(s["grad_sq"], direct_g2)
    ys = _lines_y(ax_s)
    assert np.allclose(ys[0], direct_s)
    lr = part.groupby("step")["lr"].first().to_numpy()
    assert np.allclose(ys[1], lr * direct_g2 / (2 * 2e-2 - lr * 4e-4))
    # per-layer angular update = sqrt(sum_A a_A^2 S_A / S)
    a2s = (part["angular_update"] ** 2 * part["measured"]).groupby(part["step"]).sum()
    assert np.allclose(s["angular_update"], np.sqrt(a2s / direct_s))
    assert [ax.get_title() for ax in fig.axes[:3]][1] == "angular update"


def test_fig_equilibrium_quiet_where_s_eq_is_zero(run):
    """A logged step with no gradient yet (S_eq = 0) is left out of the phase panel without a numpy warning."""
    import warnings

    view = load_run(run)
    groups = view.groups.copy()
    groups.loc[groups["step"] == groups["step"].min(), "grad_norm"] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fig = F.fig_equilibrium(RunView(groups=groups, layers=view.layers, manifest=view.manifest), smooth=1)
    assert len(fig.axes) >= 3


def test_fig_equilibrium_unavailable_without_weight_decay(run):
    view = load_run(run)
    view = RunView(groups=view.groups, layers=view.layers, manifest={"hyperparameters": {"weight_decay": 0.0}})
    with pytest.raises(FigureUnavailable, match="weight decay is 0"):
        F.fig_equilibrium(view)
    no_scale = RunView(groups=view.groups[view.groups["kind"] != "scale"])
    with pytest.raises(FigureUnavailable, match="no scale"):
        F.fig_equilibrium(no_scale)
    with pytest.raises(FigureUnavailable, match="no scale"):
        F.fig_norm_dynamics(no_scale)


def test_fig_constraints_histograms_count_every_group(run):
    c = run.constraints
    fig = F.fig_constraints(c, bins=30)
    assert len(fig.axes) == 2 and all(ax.get_xscale() == "log" for ax in fig.axes)
    ax = fig.axes[0]
    counts = {}
    for container, label in zip(ax.containers, [t.get_text() for t in ax.get_legend().get_texts()], strict=False):
        counts[label] = sum(p.get_height() for p in container)
    for kind in ("translation", "scale", "rescale"):
        n = int((c["kind"] == kind).sum())
        assert counts[f"{kind} ({n})"] == n
    class Report:  # what nm.check_constraints returns
        def to_frame(self):
            return c.drop(columns=["hess_rel", "hess_rel_random"])

    grad_only = F.fig_constraints(Report())
    assert len(grad_only.axes) == 1
    with pytest.raises(FigureUnavailable, match="lacks column"):
        F.fig_constraints(c.drop(columns=["grad_rel_random"]))
    with pytest.raises(FigureUnavailable, match="check_constraints"):
        F.fig_constraints(pd.DataFrame())


def test_fig_training_curves_and_missing_metrics(run):
    fig = F.fig_training_curves(run)
    loss_ax, acc_ax = fig.axes[:2]
    assert loss_ax.get_yscale() == "log" and acc_ax.get_ylabel() == "accuracy"
    m = run.metrics()
    val = m[(m["split"] == "val") & (m["name"] == "loss")]
    assert any(np.array_equal(y, val["value"].to_numpy()) for y in _lines_y(loss_ax))
    with pytest.raises(FigureUnavailable, match="no metrics"):
        F.fig_training_curves(OnlyFrame(run.frame()))


def test_save_writes_png_and_pdf(tmp_path, run):
    fig = F.fig_training_curves(run)
    paths = save(fig, tmp_path / "sub" / "curves.png")
    close(fig)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"


# ---- toy geometry -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["translation", "scale", "rescale"])
@pytest.mark.parametrize("n", [2, 3])
def test_toy_gradient_matches_finite_differences(kind, n):
    p = toy.TOY_PROBLEMS[kind]
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.uniform(-1.5, 1.5, n)
        eps = 1e-6
        fd = np.array([(p.loss(x + eps * e) - p.loss(x - eps * e)) / (2 * eps) for e in np.eye(n)])
        assert np.allclose(p.grad(x), fd, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["translation", "scale", "rescale"]), n=st.sampled_from([2, 3]),
       x=st.lists(st.floats(-3, 3, allow_nan=False), min_size=3, max_size=3),
       alpha=st.floats(0.3, 3.0))
def test_toy_gradient_constraint_and_symmetry(kind, n, x, alpha):
    """<grad L, xi> = 0 and L(psi(x, alpha)) = L(x): the loss really has the drawn symmetry."""
    p = toy.TOY_PROBLEMS[kind]
    v = np.asarray(x[:n])
    if np.linalg.norm(v) < 1e-2:
        v = v + 0.5
    g, xi = p.grad(v), p.generator(v)
    assert abs(g @ xi) <= 1e-9 * (1 + np.linalg.norm(g) * np.linalg.norm(xi))
    moved = {"translation": v + alpha, "scale": alpha * v,
             "rescale": np.concatenate(([alpha * v[0]], v[1:] / alpha))}[kind]
    assert p.loss(moved) == pytest.approx(p.loss(v), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("kind", ["translation", "scale", "rescale"])
def test_gradient_flow_conserves_charge_and_descends(kind):
    p = toy.TOY_PROBLEMS[kind]
    for n in (2, 3):
        traj = toy.gradient_flow(p, p.start[n])
        charges = np.array([p.charge(x) for x in traj])
        assert np.ptp(charges) <= 1e-7 * max(1.0, abs(charges[0]))
        losses = np.array([p.loss(x) for x in traj])
        assert np.all(np.diff(losses) <= 1e-12) and losses[-1] < 0.75 * losses[0]


def test_fig_conserved_surfaces_layout():
    fig = toy.fig_conserved_surfaces(n_steps=200)
    assert len(fig.axes) == 6
    assert sum(ax.name == "3d" for ax in fig.axes) == 3
    # the 2-D trajectory is drawn on the conserved curve: check the translation panel numerically
    ax = fig.axes[0]
    traj = next(line for line in ax.get_lines() if line.get_label() == "gradient flow")
    x, y = np.asarray(traj.get_xdata()), np.asarray(traj.get_ydata())
    assert np.allclose(x + y, x[0] + y[0], atol=1e-9)
