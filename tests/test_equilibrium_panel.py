"""The report's equilibrium panel for adaptive optimizers: per-layer regime verdict, figure, and the words it shows.

The regime check is exercised where its answer is known by construction: the noise objective of
`scale_invariant_sim.py` (gradients of pure noise, entries of size ~1) trained by AdamW with two param groups, one
with the default eps (in the regime: update_ratio ~ 1) and one with eps = 1e3, a thousand times the gradient, so the
updates shrink to ~1e-3 of their noise-dominated size (update_ratio ~ 1e-6, what a fitted layer looks like).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neural_mechanics.plots.equilibrium import fig_equilibrium
from neural_mechanics.plots.report import report_html
from neural_mechanics.plots.rotational import fig_rotational_equilibrium, rotational_layer_series
from neural_mechanics.plots.source import FigureUnavailable, load_run
from neural_mechanics.tracking.metrics import REGIME_MIN_UPDATE_RATIO, equilibrium_regime
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker
from scale_invariant_sim import NoiseSphere, run_noise

torch.set_num_threads(1)


def _run(tmp_path, make_opt, steps=200):
    model = NoiseSphere([(8, 16), (8, 16)], "rows", seed=5).double()
    opt = make_opt(model)
    with Tracker(model, opt, model.symmetries(), tmp_path, log_every=5):
        run_noise(model, opt, steps)
    return tmp_path


@pytest.fixture(scope="module")
def two_regimes(tmp_path_factory):
    def make(model):
        w0, w1 = model.weights
        return torch.optim.AdamW([{"params": [w0]}, {"params": [w1], "eps": 1e3}], lr=1e-2, weight_decay=0.1)
    return _run(tmp_path_factory.mktemp("two_regimes"), make)


def test_equilibrium_regime_flags_the_eps_dominated_layer_and_agrees_with_a_direct_recomputation(two_regimes):
    frame = open_run(two_regimes).frame()
    regime = equilibrium_regime(frame).set_index("layer")
    assert list(regime.index) == ["weights.0", "weights.1"] and list(regime["n_groups"]) == [8, 8]
    assert regime.loc["weights.0", "in_regime"] is True and regime.loc["weights.1", "in_regime"] is False
    assert regime.loc["weights.0", "update_ratio"] > 0.3  # ~ 1 by construction (noise gradients, tiny eps)
    assert regime.loc["weights.1", "update_ratio"] < 1e-4  # ~ (1 / 1e3)^2
    # direct recomputation: per group, the median update_ratio over the last 30 % of logged steps; per layer the
    # median over groups; the angle ratio is RMS measured over RMS predicted per group, median per layer
    cut = frame["step"].min() + 0.7 * (frame["step"].max() - frame["step"].min())
    for layer in ("weights.0", "weights.1"):
        upd, ang = [], []
        for _, g in frame[(frame["layer"] == layer) & (frame["kind"] == "scale")].groupby("group"):
            late = g[(g["step"] >= cut) & g["angular_update_eq"].notna() & g["angular_update"].notna()]
            upd.append(np.median(late["update_ratio"]))
            ang.append(np.sqrt(np.mean(late["angular_update"] ** 2) / np.mean(late["angular_update_eq"] ** 2)))
        assert regime.loc[layer, "update_ratio"] == pytest.approx(np.median(upd), rel=1e-12)
        assert regime.loc[layer, "angle_ratio"] == pytest.approx(np.median(ang), rel=1e-12)
    # the layer series of the figure: S and the predictions summed over the layer's groups, by hand
    series = rotational_layer_series(load_run(two_regimes))
    step = series["step"].max()
    last = frame[(frame["step"] == step) & frame["predicted_equilibrium"].notna()]
    row = series[(series["layer"] == "weights.0") & (series["step"] == step)].iloc[0]
    mine = last[last["layer"] == "weights.0"]
    assert row["S"] == pytest.approx(mine["measured"].sum(), rel=1e-12)
    assert row["S_eq"] == pytest.approx(mine["predicted_equilibrium"].sum(), rel=1e-12)
    assert row["angle"] == pytest.approx(np.sqrt((mine["angular_update"] ** 2 * mine["measured"]).sum()
                                                 / mine["measured"].sum()), rel=1e-12)


def test_report_shows_the_panel_and_says_which_layers_are_outside_the_regime(two_regimes):
    html = report_html(two_regimes, dpi=40)
    assert "<h2>Equilibrium</h2>" in html and "AdamW: rotational equilibrium" in html
    assert "Outside the regime of the prediction in 1 of 2 layer(s)" in html
    assert f"update_ratio &lt; {REGIME_MIN_UPDATE_RATIO:g}" in html
    assert "<figure id='fig-rotational'><h3>" in html  # drawn
    assert "fig-equilibrium" not in html  # SGD's closed forms are not drawn for AdamW
    with pytest.raises(FigureUnavailable, match="this run uses AdamW"):
        fig_equilibrium(two_regimes)


def test_no_equilibrium_for_coupled_l2_is_said_in_words(tmp_path):
    run = _run(tmp_path, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3), steps=20)
    with pytest.raises(FigureUnavailable, match="coupled L2 weight decay passes through the adaptive"):
        fig_rotational_equilibrium(run)
    html = report_html(run, dpi=40)
    assert "No equilibrium prediction:</strong> Adam: coupled L2" in html
    assert "<figure class='missing' id='fig-rotational'>" in html
