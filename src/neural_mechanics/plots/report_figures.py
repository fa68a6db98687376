"""The figures of the HTML report (plots/report.py): which ones, with what caption, drawn how.

Each `Section` names a figure, its caption and how to draw it from the run; `render_figures` draws every section
as PNG bytes, or keeps the reason it cannot be drawn (`FigureUnavailable`: e.g. no weight decay, so no equilibrium),
so the page can say why instead of leaving a figure out silently. The toy figure does not depend on the run and is
drawn once per process and dpi.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from neural_mechanics.plots import figures as F
from neural_mechanics.plots.rotational import fig_rotational_equilibrium
from neural_mechanics.plots.source import FigureUnavailable, RunView, load_run
from neural_mechanics.plots.style import close, png_bytes
from neural_mechanics.plots.toy import fig_conserved_surfaces

__all__ = ["Rendered", "Section", "render_figures"]


@dataclass(frozen=True)
class Section:
    """One figure of the report: what it shows (caption) and how to draw it from the run."""

    key: str
    title: str
    caption: str
    draw: Callable[[], Figure]


@dataclass(frozen=True)
class Rendered:
    key: str
    title: str
    caption: str
    png: bytes | None
    reason: str | None


def _sections(view: RunView, constraints: Any, param_trace: pd.DataFrame | None,
              compare: Mapping[str, Any] | None) -> list[Section]:
    runs: dict[str, Any] = {view.name: view, **{k: load_run(v) for k, v in (compare or {}).items()}}
    momentum_note = (" Rows: " + "; ".join(runs) + "." if compare else
                     " Pass `compare={'label': other_run}` (CLI: `nmech report RUN --compare LABEL=RUN_DIR`; e.g. "
                     "the same model with and without momentum) to draw them as extra rows.")
    # one equilibrium figure per run: SGD's closed forms (section 3.5) or the equilibrium columns of other optimizers
    sgd = str(view.hyper.get("optimizer") or "SGD") == "SGD"
    sections = [
        Section("training", "Training curves", "Loss (log scale) and accuracy logged by the training loop.",
                lambda: F.fig_training_curves(view)),
        Section("charges", "Charges: measured vs predicted",
                "A few groups per kind, sampled evenly over depth. Broad translucent line: measured charge; "
                "dashed: exact discrete recurrence (symmetry only); dotted: the paper's continuous "
                "modified-flow prediction." + momentum_note,
                lambda: F.fig_charges(runs)),
        Section("errors", "Prediction error over time",
                "Relative error |predicted − measured| / norm per group (norm = |S| for scale, "
                "|θ_A1|² + |θ_A2|² for rescale, Σ|θ_i| for translation; never below 1e-6 of the group's "
                "largest norm, so dead channels decaying to nothing do not dominate); line = median over the kind's "
                "groups, band up to the max. The exact recurrence with measured breaking should sit at "
                "float rounding; the gap to the symmetry-only recurrence is the symmetry breaking.",
                lambda: F.fig_prediction_error(view)),
        Section("norms", "Per-parameter vs per-filter norm dynamics (paper Fig. 1)",
                "Squared norms |θ_A|² of filters feeding a normaliser, coloured by depth. Single parameters "
                "(left, when traces were recorded) wander; the filter norms obey a smooth law.",
                lambda: F.fig_norm_dynamics(view, param_trace)),
        Section("equilibrium", "Weight-decay equilibrium of scale groups",
                "Per layer: squared norm against S_eq = η|g_A|²/(2λ − ηλ²) (momentum: η → η(1−τ)/(1−β)), "
                "the angular update against its equilibrium value, and a phase portrait in which every "
                "layer approaches (1, 0).",
                lambda: F.fig_equilibrium(view)),
        Section("rotational", "Equilibrium predictions per layer (adaptive optimizers)",
                "Per layer, from the tracker's equilibrium columns (docs/theory.md section 6.3): squared norm "
                "against predicted_equilibrium, the angle per step against angular_update_eq, and the regime "
                "check update_ratio = |u|²/(its noise-dominated value); below the grey line a layer's updates have "
                "shrunk toward eps (it fits its data) and the predictions are not expected to hold.",
                lambda: fig_rotational_equilibrium(view)),
        Section("constraints", "Gradient and Hessian constraints",
                "Relative residuals of the constraints per group next to the same quantity for random "
                "directions: many orders of magnitude apart when the symmetry holds.",
                lambda: F.fig_constraints(constraints if constraints is not None else
                                          view.extras.get("constraints", pd.DataFrame()))),
        Section("toy", "The geometry: gradient constraints and conserved surfaces",
                "Tiny explicit losses with one symmetry each. The gradient is orthogonal to the generator, so "
                "gradient flow stays on a plane (translation), a sphere (scale) or a hyperboloid (rescale).",
                fig_conserved_surfaces),
    ]
    return [sec for sec in sections if sec.key != ("rotational" if sgd else "equilibrium")]


@lru_cache(maxsize=4)
def _toy_png(dpi: int) -> bytes:
    """The toy figure does not depend on the run: draw it once per process and dpi."""
    fig = fig_conserved_surfaces()
    try:
        return png_bytes(fig, dpi=dpi)
    finally:
        close(fig)


def _render(section: Section, dpi: int) -> Rendered:
    if section.key == "toy":
        return Rendered(section.key, section.title, section.caption, _toy_png(dpi), None)
    try:
        fig = section.draw()
    except FigureUnavailable as exc:
        return Rendered(section.key, section.title, section.caption, None, str(exc))
    try:
        return Rendered(section.key, section.title, section.caption, png_bytes(fig, dpi=dpi), None)
    finally:
        close(fig)


def render_figures(run: Any, *, constraints: Any = None, param_trace: pd.DataFrame | None = None,
                   compare: Mapping[str, Any] | None = None, dpi: int = 110) -> list[Rendered]:
    """Every report figure as PNG bytes, or with the reason it cannot be drawn."""
    view = load_run(run)
    return [_render(s, dpi) for s in _sections(view, constraints, param_trace, compare)]
