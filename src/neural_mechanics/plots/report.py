"""A run as ONE self-contained HTML file: every figure embedded, no network, no external assets.

`write_report(run)` is what `nmech report RUN [--out FILE]` calls. The file holds: title and status,
the hyperparameters, a symmetry summary (groups per kind and per layer, groups the predictions do not
apply to and why), the error table (per kind, median and max relative error of each prediction at the
last logged step) and every figure the data allows, each PNG inlined as base64. A figure the data does
not allow is replaced by a short note that says why (e.g. "no weight decay, so no equilibrium"), so a
report is never silently incomplete. One file is easy to attach to an issue, archive or e-mail.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from neural_mechanics.errors import RunStoreError
from neural_mechanics.plots import figures as F
from neural_mechanics.plots.rotational import equilibrium_reason, fig_rotational_equilibrium
from neural_mechanics.plots.source import FigureUnavailable, RunView, load_run
from neural_mechanics.plots.style import KIND_COLORS, PREDICTION_STYLE, close, png_bytes
from neural_mechanics.plots.toy import fig_conserved_surfaces
from neural_mechanics.symmetry.coverage import EXTENDING
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.tracking.metrics import REGIME_MIN_UPDATE_RATIO, equilibrium_regime


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


# ---- HTML ---------------------------------------------------------------------------------------
_CSS = """
:root { --fg: #1d2330; --muted: #5b6474; --line: #e3e6eb; --bg: #f7f8fa; --card: #ffffff; --accent: #2f5fa7; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 60px; }
header { border-bottom: 1px solid var(--line); margin-bottom: 18px; padding-bottom: 12px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: var(--muted); font-size: 13px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px; font-weight: 600;
         color: #fff; background: #7a8599; vertical-align: middle; margin-left: 8px; }
.badge.complete, .badge.finished, .badge.done { background: #2e8b57; }
.badge.running { background: #c98a12; }
.badge.failed, .badge.crashed, .badge.interrupted { background: #c0392b; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(330px, 1fr)); gap: 16px; align-items: start; }
.card h3 { margin-top: 0; }
td.kindcell { white-space: nowrap; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.kind { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.err-good { background: #e6f4ea; } .err-mid { background: #fff4d6; } .err-bad { background: #fde2e1; }
figure { margin: 0 0 22px; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 8px; }
.missing { border-style: dashed; color: var(--muted); }
.missing strong { color: var(--fg); }
.scroll { max-height: 320px; overflow: auto; }
code { background: #eef1f5; padding: 0 4px; border-radius: 3px; font-size: 12.5px; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.3g}" if (v == 0 or 1e-3 <= abs(v) < 1e4) else f"{v:.2e}"
    if isinstance(v, (list, tuple)):
        return _e(", ".join(map(str, v)))
    if isinstance(v, Mapping):
        return _e(", ".join(f"{k}={val}" for k, val in v.items()))
    return _e(v)


def _kv_table(d: Mapping[str, Any]) -> str:
    if not d:
        return "<p class='meta'>none recorded</p>"
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _err_class(v: float) -> str:
    if not isinstance(v, float) or math.isnan(v):
        return ""
    return "err-good" if v < 1e-4 else "err-mid" if v < 1e-2 else "err-bad"


def missing_predictions(run: Any) -> str | None:
    """Why the run holds no predictions (the tracker's reason for the optimizer, e.g. AdamW: no exact theory), or
    None when it has them or gave no reason."""
    view = load_run(run)
    reason = view.manifest.get("not_applicable")
    return str(reason) if reason else None


def _error_table(view: RunView) -> str:
    reason = missing_predictions(view)
    note = f"<p class='meta'><strong>No predictions for this run:</strong> {_e(reason)}.</p>" if reason else ""
    return note + _error_rows(view)


def _error_rows(view: RunView) -> str:
    try:
        table = F.error_table(view)
    except FigureUnavailable as exc:
        return f"<p class='meta'>{_e(exc)}</p>"
    if table.empty:
        return "<p class='meta'>no groups</p>"
    step = int(view.groups["step"].max())
    preds = [p for p in dict.fromkeys(c.rsplit(" ", 1)[0] for c in table.columns if c != "groups")
             if table[[f"{p} median", f"{p} max"]].notna().any().any()]
    cols = [f"{p} {stat}" for p in preds for stat in ("median", "max")]
    head = ("<tr><th rowspan='2'>kind</th><th rowspan='2' class='num'>groups</th>"
            + "".join(f"<th colspan='2' class='num'>{_e(p)}</th>" for p in preds) + "</tr><tr>"
            + "".join("<th class='num'>median</th><th class='num'>max</th>" for _ in preds) + "</tr>")
    body = ""
    for kind, row in table.iterrows():
        cells = "".join(f"<td class='num {_err_class(float(row[c]))}'>{_fmt(float(row[c]))}</td>" for c in cols)
        body += (f"<tr><td class='kindcell'><span class='kind' style='background:"
                 f"{KIND_COLORS.get(str(kind), '#888')}'></span>{_e(kind)}</td>"
                 f"<td class='num'>{int(row['groups'])}</td>{cells}</tr>")
    return (f"<p class='meta'>Relative error at the last logged step ({step}); green &lt; 1e-4, amber &lt; 1e-2, "
            f"red otherwise.</p><table>{head}{body}</table>")


def _applicability(view: RunView) -> str:
    """Which predictions the tracker made and, for those it did not, why (the manifest's applicability)."""
    app = view.applicability
    if not app:
        return ""
    rows = "".join(
        f"<tr><th>{_e(PREDICTION_STYLE[c]['label'] if c in PREDICTION_STYLE else c)}</th>"
        f"<td>{'applies' if v.get('applies') else '<strong>not applicable</strong>'}</td>"
        f"<td class='meta'>{_e(v.get('reason', ''))}</td></tr>"
        for c, v in app.items())
    return f"<div class='card'><h3>Predictions</h3><table>{rows}</table></div>"


def _equilibrium(view: RunView) -> str:
    """The tracker's equilibrium verdict in words, and per layer whether it is in the theory's regime."""
    reason = equilibrium_reason(view)
    if not reason:
        return ""
    regime = equilibrium_regime(view.groups) if len(view.groups) else pd.DataFrame()
    if regime.empty:
        return f"<p class='meta'><strong>No equilibrium prediction:</strong> {_e(reason)}.</p>"
    out = [f"<p class='meta'>{_e(reason)}. Last 30 % of the logged steps, per layer (medians over its scale "
           "groups): measured / predicted angle per step, and update_ratio, the regime check.</p>"]
    records: list[dict[Any, Any]] = regime.to_dict("records")
    outside = [str(r["layer"]) for r in records if r["in_regime"] is False]
    if outside:
        out.append(f"<p><strong>Outside the regime of the prediction in {len(outside)} of {len(regime)} layer(s)"
                   f"</strong> (update_ratio &lt; {REGIME_MIN_UPDATE_RATIO:g}: the updates have shrunk toward the "
                   "optimizer's eps, typically because the layer fits its training data, so gradients are no longer "
                   "noise-dominated); their measured angles are expected to fall below the prediction.</p>")
    rows = "".join(
        f"<tr><td><code>{_e(r['layer'])}</code></td><td class='num'>{int(r['n_groups'])}</td>"
        f"<td class='num'>{_fmt(float(r['angle_ratio']))}</td><td class='num'>{_fmt(float(r['update_ratio']))}</td>"
        f"<td>{'n/a' if r['in_regime'] is None else 'yes' if r['in_regime'] else '<strong>no</strong>'}</td></tr>"
        for r in records)
    out.append("<table><tr><th>layer</th><th class='num'>groups</th><th class='num'>angle measured / predicted</th>"
               f"<th class='num'>update_ratio</th><th>in regime</th></tr>{rows}</table>")
    return "".join(out)


def _symmetry_summary(view: RunView) -> str:
    g = view.groups
    by_kind: dict[str, int]
    by_layer: dict[tuple[str, str], int]
    if view.symmetries:
        by_kind = {k: sum(1 for s in view.symmetries if s.get("kind") == k) for k in KINDS}
        by_layer = {}
        for s in view.symmetries:
            layer = s.get("layer") or str(s["members"][0]["param"]).rpartition(".")[0]
            by_layer[(layer, s["kind"])] = by_layer.get((layer, s["kind"]), 0) + 1
    elif len(g) and {"group", "kind", "layer"} <= set(g.columns):
        first = g.drop_duplicates("group")
        by_kind = {k: int((first["kind"] == k).sum()) for k in KINDS}
        sizes = first.groupby(["layer", "kind"], sort=False).size()
        by_layer = {(str(key[0]), str(key[1])): int(n) for key, n in sizes.items() if isinstance(key, tuple)}
    else:
        return "<p class='meta'>no symmetries recorded</p>"
    total = sum(by_kind.values())
    kinds = "".join(f"<tr><td><span class='kind' style='background:{KIND_COLORS[k]}'></span>{k}</td>"
                    f"<td class='num'>{n}</td><td class='meta'>{_e(KINDS[k].charge)}</td></tr>"
                    for k, n in by_kind.items())
    kinds += f"<tr><th>total</th><th class='num'>{total}</th><th></th></tr>"
    layers = list(dict.fromkeys(lay for lay, _ in by_layer))
    layer_rows = "".join(
        f"<tr><td><code>{_e(lay)}</code></td>" + "".join(
            f"<td class='num'>{by_layer.get((lay, k), 0) or ''}</td>" for k in KINDS) + "</tr>" for lay in layers)
    layer_table = ("<table><tr><th>layer</th>" + "".join(f"<th class='num'>{k}</th>" for k in KINDS) + "</tr>"
                   + layer_rows + "</table>")
    invalid = view.invalid
    inv = ""
    if invalid:
        items = list(invalid.items())
        shown = "".join(f"<tr><td><code>{_e(n)}</code></td><td>{_e(r)}</td></tr>" for n, r in items[:200])
        more = f"<p class='meta'>… and {len(items) - 200} more</p>" if len(items) > 200 else ""
        inv = (f"<h3>Groups without a valid prediction ({len(items)})</h3>"
               f"<div class='scroll'><table>{shown}</table></div>{more}")
    return (f"<div class='grid'><div class='card'><h3>Groups per kind</h3><table>{kinds}</table></div>"
            f"<div class='card'><h3>Groups per layer</h3><div class='scroll'>{layer_table}</div></div>"
            f"{_coverage_card(view.symmetry_meta)}</div>{inv}")


def _coverage_card(meta: Mapping[str, Any]) -> str:
    """The coverage of the detection (SymmetrySet.meta["coverage"], symmetry/coverage.py): the fraction of
    parameter entries in groups and every op that blocked a channel, unsupported ones marked as such."""
    cov = meta.get("coverage")
    if not isinstance(cov, Mapping):
        return ("<div class='card'><h3>Coverage</h3><p class='meta'>not recorded (the run's symmetries were "
                "stored without the detection's meta)</p></div>")
    total, inside = int(cov.get("params_total", 0)), int(cov.get("params_in_groups", 0))
    frac = float(cov.get("param_fraction", inside / total if total else 0.0))
    blocked: Mapping[str, int] = cov.get("blocked_ops") or {}
    unsupported = set(cov.get("unsupported_ops") or [])
    barriers: Mapping[str, str] = cov.get("barrier_ops") or {}
    rows = ""
    for key, n in blocked.items():
        op = key.split(" (", 1)[0]
        why = (f"unsupported: the engine does not know this op; teach it with nm.register_op ({EXTENDING})"
               if op in unsupported else f"known barrier: {barriers.get(key, '')}")
        rows += f"<tr><td><code>{_e(key)}</code></td><td class='num'>{int(n)}</td><td>{_e(why)}</td></tr>"
    table = (f"<table><tr><th>op</th><th class='num'>calls</th><th>why it blocks</th></tr>{rows}</table>" if rows
             else "<p class='meta'>no op blocked a moving channel</p>")
    loss = f"<p class='meta'>loss: {_e(meta['loss_detail'])}</p>" if meta.get("loss_detail") else ""
    return (f"<div class='card'><h3>Coverage</h3><p>{inside:,} of {total:,} parameter entries "
            f"(<strong>{100 * frac:.1f}%</strong>) are in at least one group.</p>{loss}"
            f"<h3>Ops that blocked channels</h3><div class='scroll'>{table}</div></div>")


def _figure_html(r: Rendered) -> str:
    if r.png is None:
        return (f"<figure class='missing' id='fig-{r.key}'><strong>{_e(r.title)}</strong> — not shown: "
                f"{_e(r.reason)}</figure>")
    data = base64.b64encode(r.png).decode("ascii")
    return (f"<figure id='fig-{r.key}'><h3>{_e(r.title)}</h3><img alt='{_e(r.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{_e(r.caption)}</figcaption></figure>")


def report_html(run: Any, *, constraints: Any = None, param_trace: pd.DataFrame | None = None,
                compare: Mapping[str, Any] | None = None, title: str | None = None, dpi: int = 110) -> str:
    """The report as an HTML string (see `write_report`)."""
    view = load_run(run)
    rendered = render_figures(view, constraints=constraints, param_trace=param_trace, compare=compare, dpi=dpi)
    cfg = view.manifest.get("config") or {}
    title = title or f"Neural mechanics report: {view.name}"
    steps = (f"{int(view.groups['step'].min())}–{int(view.groups['step'].max())}"
             if len(view.groups) and "step" in view.groups.columns else "none")
    facts = {"status": view.status, "logged steps": steps,
             "groups tracked": view.groups["group"].nunique() if "group" in view.groups.columns else 0}
    if view.path is not None:
        facts["run directory"] = str(view.path)
    for key in ("model", "dataset"):
        if isinstance(cfg, Mapping) and cfg.get(key):
            facts[key] = cfg[key]
    notes = view.manifest.get("notes") or []
    notes_html = ("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else ""
    versions = view.manifest.get("versions") or {}
    status = _e(view.status)
    missing = [r for r in rendered if r.png is None]
    nav = " · ".join(f"<a href='#fig-{r.key}'>{_e(r.title.split(':')[0])}</a>" for r in rendered)
    config_html = (f"<div class='card'><h3>Config</h3>{_kv_table(cfg)}</div>"
                   if isinstance(cfg, Mapping) and cfg else "")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{_e(title)}<span class='badge {status}'>{status}</span></h1>",
        f"<div class='meta'>generated {_e(time.strftime('%Y-%m-%d %H:%M'))} by neural-mechanics"
        f"{' · ' + str(len(missing)) + ' figure(s) not available' if missing else ''}</div>",
        f"<div class='meta'>{nav}</div></header>",
        "<h2>Run</h2><div class='grid'>",
        f"<div class='card'><h3>Summary</h3>{_kv_table(facts)}</div>",
        f"<div class='card'><h3>Hyperparameters</h3>{_kv_table(view.hyper)}</div>",
        config_html,
        "</div>",
        "<h2>Symmetries</h2>", _symmetry_summary(view),
        "<h2>Prediction error</h2>", _applicability(view), _error_table(view),
        "<h2>Equilibrium</h2>" if equilibrium_reason(view) else "", _equilibrium(view),
        "<h2>Figures</h2>", *(_figure_html(r) for r in rendered),
        notes_html,
        f"<footer>versions: {_fmt(versions) if versions else 'not recorded'}</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts)


def write_report(run: Any, out_path: str | Path | None = None, *, constraints: Any = None,
                 param_trace: pd.DataFrame | None = None, compare: Mapping[str, Any] | None = None,
                 title: str | None = None) -> Path:
    """Write the self-contained HTML report of `run` (a run directory or a live run object) and return its path.

    `out_path` defaults to `<run_dir>/report.html` (or ./report.html for a live object without a
    directory). Optional inputs add figures the run store does not hold: `constraints` (the report of
    `nm.check_constraints` or its `.to_frame()`), `param_trace` (per-parameter values: step, layer, param, value) and
    `compare` (label -> other run, drawn as extra rows of the charge figure, e.g. with/without momentum).
    """
    view = load_run(run)
    if out_path is None:
        out_path = (view.path / "report.html") if view.path is not None else Path("report.html")
    out = Path(out_path)
    text = report_html(view, constraints=constraints, param_trace=param_trace, compare=compare, title=title)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunStoreError(f"cannot write the report to {out}: {exc}", "pass --out with a writable path") from exc
    return out
