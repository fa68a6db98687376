"""The weight-decay equilibrium of scale groups, drawn from a run (figure 5 of the report).

Weight decay shrinks a scale-invariant group while the gradient, orthogonal to it, inflates it; the balance sets
an equilibrium squared norm S_eq and angular update (docs/theory.md section 3). The closed forms come from
`theory/equilibrium.py` (their one definition); this module only aggregates the run per layer and draws.
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
from neural_mechanics.theory.equilibrium import angular_update, norm_relaxation_rate, scale_equilibrium_from_grad

__all__ = ["fig_equilibrium", "scale_layer_series"]


def scale_layer_series(view: RunView) -> pd.DataFrame:
    """Per (layer, step), aggregated over the layer's scale groups A:

    S = sum_A |θ_A|², grad_sq = sum_A |g_A|² (groups' grad_norm², else the layers frame's grad_norm²),
    angular_update = |Δθ| / |θ| of the whole layer = sqrt(sum_A a_A² S_A / S) from the groups'
    angular_update a_A (else the layers frame's angular_update or angular_update_median), and lr.
    """
    groups = view.groups
    scale = groups[groups["kind"] == "scale"].copy()
    keys = ["layer", "step"]
    agg: dict[str, Any] = {"S": ("measured", "sum")}
    if "grad_norm" in scale.columns and scale["grad_norm"].notna().any():
        scale["_g2"] = scale["grad_norm"].astype(float) ** 2
        agg["grad_sq"] = ("_g2", lambda s: s.sum(min_count=1))
    if "angular_update" in scale.columns and scale["angular_update"].notna().any():
        scale["_a2s"] = scale["angular_update"].astype(float) ** 2 * scale["measured"]
        agg["_a2s"] = ("_a2s", lambda s: s.sum(min_count=1))
    if "lr" in scale.columns:
        agg["lr"] = ("lr", "first")
    out = scale.groupby(keys, sort=False).agg(**agg).reset_index()
    if "_a2s" in out.columns:
        out["angular_update"] = np.sqrt(out.pop("_a2s") / out["S"])
    lay = view.layers
    if len(lay) and {"step", "layer"} <= set(lay.columns):
        if "kind" in lay.columns:
            lay = lay[lay["kind"] == "scale"]
        extra = {}
        if "grad_sq" not in out.columns and "grad_norm" in lay.columns:
            extra["grad_norm"] = "grad_sq"
        if "angular_update" not in out.columns:
            for c in ("angular_update", "angular_update_median"):
                if c in lay.columns:
                    extra[c] = "angular_update"
                    break
        if extra:
            out = out.merge(lay[["layer", "step", *extra]].rename(columns=extra), on=keys, how="left")
            if "grad_norm" in extra:
                out["grad_sq"] = out["grad_sq"].astype(float) ** 2
    if "lr" not in out.columns:
        out["lr"] = view.hyper_value("lr", np.nan)
    return out


def fig_equilibrium(run: Any, smooth: int | None = None) -> Figure:
    """Scale groups at the weight-decay equilibrium, per layer (colour = depth).

    (a) S = sum of |θ_A|² over the layer's scale groups (solid) against S_eq (dashed) computed from the
        layer's |g|² (layers frame grad_norm²) with `theory.equilibrium.scale_equilibrium_from_grad`; both smoothed
        over `smooth` steps.
    (b) angular update |Δθ|/|θ| per step against its equilibrium value `theory.equilibrium.angular_update`.
    (c) phase portrait: x = S / S_eq, y = (1/S) dS/dt with t = eta k. Under SGD every layer falls on
        y = (2 lambda - eta lambda²)(1/x - 1) (black), whatever its gradient scale, and the equilibrium is (1, 0);
        with momentum the guide is 2 lambda (1 - tau) / (1 - beta) (1/x - 1) (leading order in eta lambda).
    """
    view = load_run(run)
    view.require("groups", ("step", "group", "kind", "layer", "measured"), "equilibrium")
    if "scale" not in view.kinds():
        raise FigureUnavailable("equilibrium: the run has no scale symmetries")
    optimizer = str(view.hyper.get("optimizer") or "SGD")
    if optimizer != "SGD":
        raise FigureUnavailable(f"equilibrium: this figure draws SGD's closed forms (docs/theory.md section 3.5); "
                                f"this run uses {optimizer}: its predictions are drawn by "
                                "plots.rotational.fig_rotational_equilibrium")
    lam = view.hyper_value("weight_decay", 0.0)
    if lam <= 0:
        raise FigureUnavailable("equilibrium: weight decay is 0, so scale charges have no equilibrium",
                                "train with weight_decay > 0 to see the equilibrium")
    beta, tau = view.hyper_value("momentum", 0.0), view.hyper_value("dampening", 0.0)
    if beta != 0 and tau >= 1:
        raise FigureUnavailable(f"equilibrium: dampening {tau:g} >= 1 with momentum: the gradient never enters the "
                                "momentum buffer, so weight decay and gradient do not balance (no equilibrium)")
    series = scale_layer_series(view)
    has_g = "grad_sq" in series.columns and series["grad_sq"].notna().any()
    has_ang = "angular_update" in series.columns and series["angular_update"].notna().any()
    order = [layer for layer in view.layer_order() if layer in set(series["layer"])]
    colors = depth_colors(order)
    n_panels = 1 + int(has_ang) + int(has_g)
    with style():
        fig = new_figure(ncols=n_panels, width=4.2, height=3.3)
        axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
        ax_s = axes.pop(0)
        ax_a = axes.pop(0) if has_ang else None
        ax_p = axes.pop(0) if has_g else None
        x_range = [0.5, 2.0]
        for layer in order:
            s = series[series["layer"] == layer].sort_values("step")
            w = smoothing_window(len(s), smooth)
            color = colors[layer]
            ax_s.plot(s["step"], s["S"], color=color, lw=1.3)
            if has_g:
                g2 = moving_average(s["grad_sq"], w)
                s_eq = scale_equilibrium_from_grad(s["lr"].to_numpy(), lam, g2, beta, tau).numpy()
                ax_s.plot(s["step"], s_eq, color=color, lw=1.0, linestyle="--")
                if ax_p is not None:
                    steps = s["step"].to_numpy()
                    dt = np.diff(steps) * s["lr"].to_numpy()[:-1]
                    with np.errstate(divide="ignore", invalid="ignore"):  # S_eq = 0 (no gradient yet): not drawn
                        rate = np.diff(s["S"].to_numpy()) / dt / s["S"].to_numpy()[:-1]
                        x = (s["S"].to_numpy() / s_eq)[:-1]
                    xs, ys = moving_average(x, w), moving_average(rate, w)
                    finite = xs[np.isfinite(xs) & (xs > 0)]
                    if finite.size:
                        x_range = [min(x_range[0], float(finite.min())), max(x_range[1], float(finite.max()))]
                    ax_p.plot(xs, ys, color=color, lw=1.1)
                    ax_p.plot(xs[:1], ys[:1], "o", color=color, ms=3.5)
            if ax_a is not None:
                ax_a.plot(s["step"], moving_average(s["angular_update"], w), color=color, lw=1.1)
        ax_s.set_yscale("log")
        ax_s.set_xlabel("step")
        ax_s.set_ylabel("Σ |θ_A|² over the layer")
        ax_s.set_title("squared norm (solid) vs S_eq (dashed)" if has_g else "squared norm")
        lr_steps = series.drop_duplicates("step").sort_values("step")
        if ax_a is not None:
            limit = angular_update(lr_steps["lr"].to_numpy(), lam, beta, tau).numpy()
            ax_a.plot(lr_steps["step"], limit, color="black", lw=1.3, linestyle="--",
                      label="√(2ηλ − η²λ²)" if beta == 0 else "√(2ηλ(1−τ)/(1+β))")
            ax_a.set_yscale("log")
            plain_log_ticks(ax_a.yaxis)
            ax_a.set_xlabel("step")
            ax_a.set_ylabel("|Δθ_A| / |θ_A| per step")
            ax_a.set_title("angular update")
            ax_a.legend(loc="upper right")
        if ax_p is not None:
            lr0 = float(np.nanmedian(lr_steps["lr"]))
            ylim = ax_p.get_ylim()
            xx = np.geomspace(x_range[0] / 1.2, x_range[1] * 1.2, 200)
            # SGD: exact in expectation; momentum: leading order in eta lambda (weight decay carried by the buffer)
            a = float(norm_relaxation_rate(lr0, lam, beta, tau))
            ax_p.plot(xx, a * (1 / xx - 1), color="black", lw=1.2, linestyle="--",
                      label="(2λ − ηλ²)(S_eq/S − 1)" if beta == 0 else "2λ(1−τ)/(1−β) (S_eq/S − 1)")
            ax_p.set_ylim(min(ylim[0], -0.1 * a), max(ylim[1], 0.1 * a))
            ax_p.set_xscale("log")
            ax_p.set_xlim(x_range[0] / 1.2, x_range[1] * 1.2)
            plain_log_ticks(ax_p.xaxis)
            ax_p.axhline(0, color="grey", lw=0.8)
            ax_p.axvline(1, color="grey", lw=0.8)
            ax_p.set_xlabel("S / S_eq")
            ax_p.set_ylabel("(1/S) dS/dt")
            ax_p.set_title("phase portrait (o = start)")
            ax_p.legend(loc="upper right")
        depth_colorbar(fig, fig.axes, order)
        fig.suptitle(f"Scale groups at the weight-decay equilibrium (λ = {lam:g}, β = {beta:g})")
    return fig
