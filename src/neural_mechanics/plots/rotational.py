"""The rotational equilibrium of scale groups under adaptive optimizers, drawn from a run (the report's panel).

AdamW, Lion and Muon shrink a scale group by a = 1 - eta lambda per step while their normalised updates inflate it;
in the noise-dominated regime the balance sets an equilibrium squared norm and angle per step, the same in every
layer (docs/theory.md section 6.3). The tracker logs the predictions per group (`predicted_equilibrium`,
`angular_update_eq`) and the regime check `update_ratio` (|u|^2_A over its noise-dominated value); this module
only sums them per layer and draws; the per-layer regime verdict is `tracking.metrics.equilibrium_regime`.

    (a) S = sum_A |theta_A|^2 over the layer's scale groups (solid) against sum_A predicted_equilibrium (dashed)
    (b) the layer's angle per step, sqrt(sum_A angle_A^2 S_A / S), against the median angular_update_eq (black)
    (c) update_ratio, median over the layer's groups: below REGIME_MIN_UPDATE_RATIO (grey line) the layer has left
        the regime (updates shrunk toward eps) and (a), (b) are not expected to agree
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neural_mechanics.plots.source import FigureUnavailable, RunView, load_run
from neural_mechanics.plots.style import (
    depth_colorbar,
    depth_colors,
    moving_average,
    new_figure,
    plain_log_ticks,
    smoothing_window,
    style,
)
from neural_mechanics.tracking.metrics import REGIME_MIN_UPDATE_RATIO

__all__ = ["equilibrium_reason", "fig_rotational_equilibrium", "rotational_layer_series"]


def equilibrium_reason(view: RunView) -> str:
    """The tracker's verdict on the run's equilibrium in words (manifest "equilibrium"), "" when it has none."""
    eq = view.manifest.get("equilibrium")
    return str(eq.get("reason", "")) if isinstance(eq, dict) else ""


def rotational_layer_series(view: RunView) -> pd.DataFrame:
    """Per (layer, step) over the layer's scale groups with a prediction: S (sum of measured), S_eq (sum of
    predicted_equilibrium), angle (sqrt(sum angle_A^2 S_A / S)), angle_eq (median angular_update_eq) and
    update_ratio (median)."""
    g = view.groups
    df = g[(g["kind"] == "scale") & g["predicted_equilibrium"].notna()].copy()
    df["_a2s"] = df["angular_update"].astype(float) ** 2 * df["measured"]
    out = df.groupby(["layer", "step"], sort=False).agg(
        S=("measured", "sum"), S_eq=("predicted_equilibrium", "sum"), _a2s=("_a2s", lambda s: s.sum(min_count=1)),
        angle_eq=("angular_update_eq", "median"), update_ratio=("update_ratio", "median")).reset_index()
    out["angle"] = np.sqrt(out.pop("_a2s") / out["S"])
    return out


def fig_rotational_equilibrium(run: Any, smooth: int | None = None) -> Figure:
    """Scale groups at the rotational equilibrium of an adaptive optimizer, per layer (colour = depth); see the
    module docstring for the three panels. FigureUnavailable, with the tracker's reason, when the run has no
    prediction (no weight decay, coupled L2 through the preconditioner, an optimizer without a theory)."""
    view = load_run(run)
    cols = ("step", "group", "kind", "layer", "measured", "predicted_equilibrium", "angular_update",
            "angular_update_eq", "update_ratio")
    view.require("groups", cols, "rotational equilibrium")
    g = view.groups
    if not ((g["kind"] == "scale") & g["predicted_equilibrium"].notna()).any():
        why = equilibrium_reason(view) or "the run has no scale group with an equilibrium prediction"
        raise FigureUnavailable(f"rotational equilibrium: no prediction. {why}")
    series = rotational_layer_series(view)
    order = [layer for layer in view.layer_order() if layer in set(series["layer"])]
    colors = depth_colors(order)
    has_ratio = series["update_ratio"].notna().any()
    n_panels = 2 + int(has_ratio)
    with style():
        fig = new_figure(ncols=n_panels, width=4.2, height=3.3)
        axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
        ax_s, ax_a = axes[0], axes[1]
        for layer in order:
            s = series[series["layer"] == layer].sort_values("step")
            w = smoothing_window(len(s), smooth)
            color = colors[layer]
            ax_s.plot(s["step"], s["S"], color=color, lw=1.3)
            ax_s.plot(s["step"], moving_average(s["S_eq"], w), color=color, lw=1.0, linestyle="--")
            ax_a.plot(s["step"], moving_average(s["angle"], w), color=color, lw=1.1)
            if has_ratio:
                axes[2].plot(s["step"], moving_average(s["update_ratio"], w), color=color, lw=1.1)
        steps = series.groupby("step")["angle_eq"].median().sort_index()
        ax_a.plot(steps.index, steps.to_numpy(), color="black", lw=1.3, linestyle="--", label="predicted")
        ax_s.set_yscale("log")
        ax_s.set_xlabel("step")
        ax_s.set_ylabel("Σ |θ_A|² over the layer")
        ax_s.set_title("squared norm (solid) vs predicted (dashed)")
        ax_a.set_yscale("log")
        plain_log_ticks(ax_a.yaxis)
        ax_a.set_xlabel("step")
        ax_a.set_ylabel("angle(θ_k, θ_k+1) per step")
        ax_a.set_title("angular update")
        ax_a.legend(loc="upper right")
        if has_ratio:
            ax_r = axes[2]
            ax_r.axhline(REGIME_MIN_UPDATE_RATIO, color="grey", lw=1.0, linestyle=":",
                         label=f"regime threshold {REGIME_MIN_UPDATE_RATIO:g}")
            ax_r.axhline(1.0, color="black", lw=0.8)
            ax_r.set_yscale("log")
            ax_r.set_xlabel("step")
            ax_r.set_ylabel("|u|² / noise-dominated value")
            ax_r.set_title("regime check (update_ratio)")
            ax_r.legend(loc="lower left")
        depth_colorbar(fig, fig.axes, order)
        opt = view.hyper.get("optimizer", "")
        fig.suptitle(f"Rotational equilibrium of scale groups ({opt}, η = {view.hyper_value('lr', np.nan):g}, "
                     f"λ = {view.hyper_value('weight_decay', 0.0):g})")
    return fig
