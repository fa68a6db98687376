"""The paper's figures, drawn from a run (a live object or a run directory; see `source.load_run`).

One function per figure; each returns a matplotlib Figure and raises `FigureUnavailable` (with the
reason) when the run lacks the data. Nothing here computes a prediction: the tracker does that.
The only arithmetic is presentation (relative errors, smoothing, the closed-form equilibrium values
of docs/theory.md section 3 that a figure overlays on the measurement, from `theory/equilibrium.py`).

1. `fig_norm_dynamics`     per-parameter vs per-filter squared norms (paper Fig. 1)
2. `fig_charges`           measured vs exact vs paper charges per group, a panel per kind (and per run)
3. `fig_prediction_error`  relative error of each prediction over time (median and max per kind)
4. `fig_constraints`       gradient/Hessian constraint residuals against a random-direction baseline
5. `fig_equilibrium`       squared norm vs S_eq, angular update vs its limit, a normalised phase portrait
                           (in `equilibrium.py`, with `scale_layer_series`; re-exported here)
7. `fig_training_curves`   loss and accuracy
(6, the toy pictures of the conserved surfaces, is in `toy.py`: it needs no run.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from neural_mechanics.plots.equilibrium import fig_equilibrium, scale_layer_series
from neural_mechanics.plots.source import FigureUnavailable, group_errors, load_run
from neural_mechanics.plots.style import (
    KIND_COLORS,
    PREDICTION_STYLE,
    SPLIT_STYLE,
    depth_colorbar,
    depth_colors,
    moving_average,
    new_figure,
    smoothing_window,
    style,
)
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.tracking.metrics import PREDICTION_COLUMNS

__all__ = ["CHARGE_LABEL", "error_table", "fig_charges", "fig_constraints", "fig_equilibrium", "fig_norm_dynamics",
           "fig_prediction_error", "fig_training_curves", "scale_layer_series"]

CHARGE_LABEL = {"translation": "T = <θ, 1_A>", "scale": "S = |θ_A|²", "rescale": "R = |θ_A1|² − |θ_A2|²"}


def _sample_groups(groups: pd.DataFrame, n: int, layer_order: Sequence[str]) -> list[str]:
    """`n` group names spread evenly over the network (ordered by layer depth, then name)."""
    names = groups[["group", "layer"]].drop_duplicates("group")
    rank = {layer: i for i, layer in enumerate(layer_order)}
    names = names.assign(r=names["layer"].map(rank).fillna(len(rank))).sort_values(["r", "group"])
    listed = names["group"].tolist()
    if len(listed) <= n:
        return listed
    idx = np.unique(np.linspace(0, len(listed) - 1, n).round().astype(int))
    return [listed[i] for i in idx]


# ---- 1. per-parameter vs per-filter ---------------------------------------------------------------
def fig_norm_dynamics(run: Any, param_trace: pd.DataFrame | None = None, max_groups_per_layer: int = 12) -> Figure:
    """Paper Fig. 1: squared values of single parameters (noisy) vs per-filter |θ_A|² (smooth).

    The right panel plots the measured scale charge S = |θ_A|² of up to `max_groups_per_layer`
    filters per layer, coloured by depth. The left panel needs per-parameter traces, which the run
    store does not keep: pass `param_trace`, a frame with columns step, layer, param, value (θ_i at
    that step), or let the run carry one as `.param_trace`. Without it only the per-filter panel is drawn.
    """
    view = load_run(run)
    groups = view.require("groups", ("step", "group", "kind", "layer", "measured"), "norm dynamics")
    scale = groups[groups["kind"] == "scale"]
    if scale.empty:
        raise FigureUnavailable("norm dynamics: the run has no scale symmetries (no normalised layers)",
                                "use a model with BatchNorm/LayerNorm to see per-filter norm dynamics")
    trace = param_trace if param_trace is not None else view.extras.get("param_trace")
    has_trace = trace is not None and len(trace) > 0 and {"step", "layer", "value"} <= set(trace.columns)
    order = [layer for layer in view.layer_order() if layer in set(scale["layer"])]
    colors = depth_colors(order)
    with style():
        fig = new_figure(ncols=2 if has_trace else 1, width=4.6, height=3.4)
        axes = fig.subplots(1, 2 if has_trace else 1, sharey=False, squeeze=False)[0]
        if has_trace:
            assert trace is not None
            ax = axes[0]
            key = "param" if "param" in trace.columns else "layer"
            for keys, part in trace.groupby(["layer", key], sort=False):
                part = part.sort_values("step")
                layer = str(keys[0]) if isinstance(keys, tuple) else str(keys)
                ax.plot(part["step"], np.asarray(part["value"], dtype=float) ** 2, color=colors.get(layer, "grey"),
                        lw=0.8, alpha=0.75)
            ax.set_yscale("log")
            ax.set_title("per parameter: θ_i²")
            ax.set_xlabel("step")
            ax.set_ylabel("squared value")
        ax = axes[-1]
        for layer in order:
            part = scale[scale["layer"] == layer]
            keep = _sample_groups(part, max_groups_per_layer, order)
            for _, g in part[part["group"].isin(keep)].groupby("group"):
                g = g.sort_values("step")
                ax.plot(g["step"], g["measured"], color=colors[layer], lw=0.9, alpha=0.85)
        ax.set_yscale("log")
        ax.set_title("per filter: |θ_A|² (scale charge)")
        ax.set_xlabel("step")
        ax.set_ylabel("squared norm")
        depth_colorbar(fig, axes.tolist(), order)
        fig.suptitle("Norm dynamics: single parameters are noisy, filter norms are smooth"
                     if has_trace else "Per-filter norm dynamics (per-parameter traces not recorded)")
    return fig


# ---- 2. charges -----------------------------------------------------------------------------------
def fig_charges(runs: Any, kinds: Sequence[str] | None = None, n_groups: int = 4,
                predictions: Sequence[str] = ("predicted_exact", "predicted_paper")) -> Figure:
    """Measured charge per group (solid) against its predictions (exact dashed, paper dotted).

    `runs` is one run or a mapping label -> run (e.g. {"SGD": run_a, "momentum 0.9": run_b}); each
    run is a row of panels, each kind a column. `n_groups` groups per panel are sampled evenly over
    the network's depth; each gets its own colour, shared by its measured and predicted curves.
    """
    labelled = _labelled_runs(runs)
    views = {label: load_run(r) for label, r in labelled.items()}
    for label, v in views.items():
        v.require("groups", ("step", "group", "kind", "layer", "measured"), f"charges ({label})")
    shown = list(kinds) if kinds is not None else [k for k in KINDS if any(k in v.kinds() for v in views.values())]
    if not shown:
        raise FigureUnavailable("charges: the run has no symmetry groups")
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    with style():
        fig = new_figure(ncols=len(shown), nrows=len(views), width=4.0, height=3.0)
        axes = fig.subplots(len(views), len(shown), squeeze=False)
        for r, (label, view) in enumerate(views.items()):
            order = view.layer_order()
            for c, kind in enumerate(shown):
                ax = axes[r, c]
                part = view.groups[view.groups["kind"] == kind]
                if part.empty:
                    ax.text(0.5, 0.5, f"no {kind} groups", ha="center", va="center", transform=ax.transAxes)
                    ax.set_axis_off()
                    continue
                for i, name in enumerate(_sample_groups(part, n_groups, order)):
                    g = part[part["group"] == name].sort_values("step")
                    color = palette[i % len(palette)]
                    # measured: a broad translucent band, so that predictions on top of it stay visible
                    ax.plot(g["step"], g["measured"], color=color, lw=4.0, alpha=0.35, solid_capstyle="butt")
                    for col in predictions:
                        if col in g.columns and g[col].notna().any():
                            ax.plot(g["step"], g[col], color=color, lw=1.2,
                                    linestyle=PREDICTION_STYLE[col]["linestyle"])
                ax.set_title(f"{kind} — {label}" if len(views) > 1 else f"{kind} ({part['group'].nunique()} groups)")
                ax.set_xlabel("step")
                ax.set_ylabel(CHARGE_LABEL[kind])
                m = part["measured"]
                if kind == "scale" and (m > 0).all() and m.max() > 10 * m.min():
                    ax.set_yscale("log")
        handles = [Line2D([], [], color="#333333", lw=4.0, alpha=0.35, linestyle="-", label="measured")]
        handles += [Line2D([], [], color="#333333", lw=1.2, linestyle=PREDICTION_STYLE[p]["linestyle"],
                           label=PREDICTION_STYLE[p]["label"]) for p in predictions]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        fig.suptitle("Charges per group: measured vs predicted (colour = group)")
    return fig


def _labelled_runs(runs: Any) -> dict[str, Any]:
    if isinstance(runs, Mapping):
        return dict(runs)
    if isinstance(runs, (list, tuple)):
        return {load_run(r).name: r for r in runs}
    return {load_run(runs).name: runs}


# ---- 3. prediction error ------------------------------------------------------------------------
def error_table(run: Any, step: int | None = None, floor: float | None = None) -> pd.DataFrame:
    """Per kind, the median and max relative error of each prediction at `step` (default: the last).

    Relative error as in `source.group_errors`: |p - m| / max(n, floor * max_k n_k), n = the tracker's
    norm (|m| when absent). Rows are
    kinds; columns "<prediction> median" / "<prediction> max" plus "groups" (valid groups counted).
    """
    view = load_run(run)
    groups = view.require("groups", ("step", "group", "kind", "measured"), "error table")
    err = group_errors(groups, floor=floor)
    at = int(err["step"].max()) if step is None else int(step)
    last = err[err["step"] == at]
    rows = []
    for kind in view.kinds():
        part = last[last["kind"] == kind]
        row: dict[str, Any] = {"kind": kind, "groups": int(part["group"].nunique())}
        for col in PREDICTION_COLUMNS:
            e = part.get("err_" + col.removeprefix("predicted_"))
            vals = e.dropna() if e is not None else pd.Series(dtype=float)
            row[f"{PREDICTION_STYLE[col]['label']} median"] = float(vals.median()) if len(vals) else np.nan
            row[f"{PREDICTION_STYLE[col]['label']} max"] = float(vals.max()) if len(vals) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("kind") if rows else pd.DataFrame()


def fig_prediction_error(run: Any, predictions: Sequence[str] = PREDICTION_COLUMNS,
                         floor: float | None = None) -> Figure:
    """Relative error |p - m| / max(n, floor max_k n_k) of each prediction over time, per kind (`group_errors`).

    Solid line: median over the kind's groups; shaded band up to the max; thin line: the max.
    Exact zeros (e.g. at the first step, where every prediction starts from the measured charge)
    are not drawn on the log axis.
    """
    view = load_run(run)
    groups = view.require("groups", ("step", "group", "kind", "measured"), "prediction error")
    cols = [p for p in predictions if p in groups.columns and groups[p].notna().any()]
    if not cols:
        why = "; ".join(dict.fromkeys(str(v.get("reason", "")) for v in view.applicability.values()
                                      if not v.get("applies")))
        raise FigureUnavailable("prediction error: the run holds no predictions" + (f" ({why})" if why else ""))
    err = group_errors(groups, tuple(cols), floor=floor)
    names = ["err_" + c.removeprefix("predicted_") for c in cols]
    if not (err[names] > 0).to_numpy().any():  # a log axis with nothing on it cannot be drawn
        raise FigureUnavailable("prediction error: every prediction equals the measured charge at every logged step "
                                "(a run this short has no error to draw)")
    kinds = view.kinds()
    with style():
        fig = new_figure(ncols=len(kinds), width=4.0, height=3.2)
        axes = fig.subplots(1, len(kinds), squeeze=False, sharey=True)[0]
        for ax, kind in zip(axes, kinds, strict=True):
            part = err[err["kind"] == kind]
            for i, col in enumerate(cols):
                e = "err_" + col.removeprefix("predicted_")
                stats = part.groupby("step")[e].agg(["median", "max"]).dropna()
                if stats.empty:
                    continue
                st = PREDICTION_STYLE[col]
                med = stats["median"].where(stats["median"] > 0)
                top = stats["max"].where(stats["max"] > 0)
                # decreasing widths: a prediction identical to an earlier one leaves that one visible as an outline
                ax.plot(stats.index, med, color=st["color"], lw=2.6 - 0.6 * i, label=f"{st['label']} (median)")
                ax.plot(stats.index, top, color=st["color"], lw=0.7, alpha=0.8)
                ax.fill_between(stats.index, med, top, color=st["color"], alpha=0.12, lw=0)
            ax.set_yscale("log")
            ax.set_title(f"{kind} ({part['group'].nunique()} groups)")
            ax.set_xlabel("step")
        axes[0].set_ylabel("relative error")
        handles = [Line2D([], [], color=PREDICTION_STYLE[c]["color"], lw=1.5, label=PREDICTION_STYLE[c]["label"])
                   for c in cols]
        handles.append(Line2D([], [], color="grey", lw=0.7, label="max over groups (band: median → max)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        fig.suptitle("Prediction error over time (line: median over groups)")
    return fig


# ---- 4. constraints -----------------------------------------------------------------------------
CONSTRAINT_COLUMNS = ("name", "kind", "grad_rel", "grad_rel_random")


def fig_constraints(constraints: Any, bins: int = 40) -> Figure:
    """Histograms (log x) of relative constraint residuals per group against the random baseline.

    Input: a constraint report with columns name, kind, grad_rel, grad_rel_random and optionally
    hess_rel, hess_rel_random, or the `ConstraintReport` of `nm.check_constraints` itself (anything with
    `.to_frame()`). The symmetry's residual should sit at float
    rounding (~1e-7) while a random direction gives O(1): the gap is the evidence for the symmetry.
    """
    if hasattr(constraints, "to_frame"):
        constraints = constraints.to_frame()
    if constraints is None or len(constraints) == 0:
        raise FigureUnavailable("constraints: no constraint report",
                                "run nm.check_constraints(model, loss_fn, batch, symmetries) and pass its frame")
    missing = [c for c in CONSTRAINT_COLUMNS if c not in constraints.columns]
    if missing:
        raise FigureUnavailable(f"constraints: the report lacks column(s) {', '.join(missing)}")
    panels = [("gradient", "grad_rel", "grad_rel_random")]
    if {"hess_rel", "hess_rel_random"} <= set(constraints.columns) and constraints["hess_rel"].notna().any():
        panels.append(("Hessian", "hess_rel", "hess_rel_random"))
    kinds = [k for k in KINDS if k in set(constraints["kind"])]
    with style():
        fig = new_figure(ncols=len(panels), width=4.4, height=3.2)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, col, rnd) in zip(axes, panels, strict=True):
            values = pd.concat([constraints[col], constraints[rnd]]).astype(float)
            pos = values[values > 0]
            lo = max(pos.min() if len(pos) else 1e-17, 1e-17) / 2
            hi = max(float(values.max()) if len(values) else 1.0, lo * 10) * 2
            edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
            for kind in kinds:
                part = constraints[constraints["kind"] == kind]
                ax.hist(part[col].astype(float).clip(lower=lo), bins=edges, color=KIND_COLORS[kind], alpha=0.75,
                        label=f"{kind} ({len(part)})")
            ax.hist(constraints[rnd].astype(float).clip(lower=lo), bins=edges, histtype="step", color="#444444",
                    lw=1.3, hatch="//", label="random direction")
            ax.set_xscale("log")
            ax.set_title(f"{title} constraint")
            ax.set_xlabel("relative residual" + (" |<g, ξ>| / (|g| |ξ|)" if col == "grad_rel" else ""))
            ax.set_ylabel("groups")
            ax.legend(loc="upper center")
        fig.suptitle("Constraint residuals: symmetry generators vs random directions")
    return fig


# ---- 7. training curves -------------------------------------------------------------------------
def fig_training_curves(run: Any, smooth: int | None = None) -> Figure:
    """Loss (log y) and accuracy per step from the metrics frame; train raw (faint) and smoothed, val markers."""
    view = load_run(run)
    metrics = view.require("metrics", ("step", "split", "name", "value"), "training curves")
    names = [n for n in ("loss", "accuracy") if n in set(metrics["name"])]
    names += sorted(set(metrics["name"]) - set(names))
    with style():
        fig = new_figure(ncols=len(names), width=4.0, height=3.0)
        axes = fig.subplots(1, len(names), squeeze=False)[0]
        for ax, name in zip(axes, names, strict=True):
            part = metrics[metrics["name"] == name]
            for split, s in part.groupby("split", sort=False):
                s = s.sort_values("step")
                st = SPLIT_STYLE.get(str(split), {"color": "#7f7f7f", "linestyle": "-"})
                if len(s) > 50:
                    ax.plot(s["step"], s["value"], color=st["color"], lw=0.6, alpha=0.3)
                    avg = moving_average(s["value"], smoothing_window(len(s), smooth))
                    ax.plot(s["step"], avg, color=st["color"], lw=1.5, label=str(split))
                else:
                    ax.plot(s["step"], s["value"], color=st["color"], lw=1.4, marker="o", ms=3, label=str(split),
                            linestyle=st["linestyle"])
            if name == "loss" and (part["value"] > 0).all():
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(name)
            ax.set_title(name)
            ax.legend()
        fig.suptitle("Training curves")
    return fig
