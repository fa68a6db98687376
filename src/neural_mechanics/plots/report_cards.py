"""The cards and tables of the HTML report (plots/report.py), each an HTML fragment computed from the run.

The symmetry summary (groups per kind and per layer, the detection's coverage, groups without a valid prediction),
the predictions that apply and why the others do not, the error table (per kind, median and max relative error of
each prediction at the last logged step), the equilibrium verdict per layer, and one figure (an inlined PNG, or the
reason it is not shown). Every value is HTML-escaped (`esc`) and numbers are formatted by `fmt`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from neural_mechanics.plots import figures as F
from neural_mechanics.plots.report_figures import Rendered
from neural_mechanics.plots.rotational import equilibrium_reason
from neural_mechanics.plots.source import FigureUnavailable, RunView, load_run
from neural_mechanics.plots.style import KIND_COLORS, PREDICTION_STYLE
from neural_mechanics.symmetry.coverage import EXTENDING
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.tracking.metrics import REGIME_MIN_UPDATE_RATIO, equilibrium_regime

__all__ = ["applicability_html", "equilibrium_html", "error_table_html", "esc", "figure_html", "fmt", "kv_table",
           "missing_predictions", "symmetry_summary_html"]


def esc(x: Any) -> str:
    """`x` as text, HTML-escaped."""
    return html.escape(str(x))


def fmt(v: Any) -> str:
    """A value for a table cell: floats to 3 significant digits (NaN as a dash), sequences and mappings joined."""
    if isinstance(v, bool) or v is None:
        return esc(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.3g}" if (v == 0 or 1e-3 <= abs(v) < 1e4) else f"{v:.2e}"
    if isinstance(v, (list, tuple)):
        return esc(", ".join(map(str, v)))
    if isinstance(v, Mapping):
        return esc(", ".join(f"{k}={val}" for k, val in v.items()))
    return esc(v)


def kv_table(d: Mapping[str, Any]) -> str:
    """A two-column table of the mapping `d` (key, formatted value)."""
    if not d:
        return "<p class='meta'>none recorded</p>"
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v)}</td></tr>" for k, v in d.items())
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


def error_table_html(view: RunView) -> str:
    """The error table of the run, after a note saying why it holds no predictions when it holds none."""
    reason = missing_predictions(view)
    note = f"<p class='meta'><strong>No predictions for this run:</strong> {esc(reason)}.</p>" if reason else ""
    return note + _error_rows(view)


def _error_rows(view: RunView) -> str:
    try:
        table = F.error_table(view)
    except FigureUnavailable as exc:
        return f"<p class='meta'>{esc(exc)}</p>"
    if table.empty:
        return "<p class='meta'>no groups</p>"
    step = int(view.groups["step"].max())
    preds = [p for p in dict.fromkeys(c.rsplit(" ", 1)[0] for c in table.columns if c != "groups")
             if table[[f"{p} median", f"{p} max"]].notna().any().any()]
    cols = [f"{p} {stat}" for p in preds for stat in ("median", "max")]
    head = ("<tr><th rowspan='2'>kind</th><th rowspan='2' class='num'>groups</th>"
            + "".join(f"<th colspan='2' class='num'>{esc(p)}</th>" for p in preds) + "</tr><tr>"
            + "".join("<th class='num'>median</th><th class='num'>max</th>" for _ in preds) + "</tr>")
    body = ""
    for kind, row in table.iterrows():
        cells = "".join(f"<td class='num {_err_class(float(row[c]))}'>{fmt(float(row[c]))}</td>" for c in cols)
        body += (f"<tr><td class='kindcell'><span class='kind' style='background:"
                 f"{KIND_COLORS.get(str(kind), '#888')}'></span>{esc(kind)}</td>"
                 f"<td class='num'>{int(row['groups'])}</td>{cells}</tr>")
    return (f"<p class='meta'>Relative error at the last logged step ({step}); green &lt; 1e-4, amber &lt; 1e-2, "
            f"red otherwise.</p><table>{head}{body}</table>")


def applicability_html(view: RunView) -> str:
    """Which predictions the tracker made and, for those it did not, why (the manifest's applicability)."""
    app = view.applicability
    if not app:
        return ""
    rows = "".join(
        f"<tr><th>{esc(PREDICTION_STYLE[c]['label'] if c in PREDICTION_STYLE else c)}</th>"
        f"<td>{'applies' if v.get('applies') else '<strong>not applicable</strong>'}</td>"
        f"<td class='meta'>{esc(v.get('reason', ''))}</td></tr>"
        for c, v in app.items())
    return f"<div class='card'><h3>Predictions</h3><table>{rows}</table></div>"


def equilibrium_html(view: RunView) -> str:
    """The tracker's equilibrium verdict in words, and per layer whether it is in the theory's regime."""
    reason = equilibrium_reason(view)
    if not reason:
        return ""
    regime = equilibrium_regime(view.groups) if len(view.groups) else pd.DataFrame()
    if regime.empty:
        return f"<p class='meta'><strong>No equilibrium prediction:</strong> {esc(reason)}.</p>"
    out = [f"<p class='meta'>{esc(reason)}. Last 30 % of the logged steps, per layer (medians over its scale "
           "groups): measured / predicted angle per step, and update_ratio, the regime check.</p>"]
    records: list[dict[Any, Any]] = regime.to_dict("records")
    outside = [str(r["layer"]) for r in records if r["in_regime"] is False]
    if outside:
        out.append(f"<p><strong>Outside the regime of the prediction in {len(outside)} of {len(regime)} layer(s)"
                   f"</strong> (update_ratio &lt; {REGIME_MIN_UPDATE_RATIO:g}: the updates have shrunk toward the "
                   "optimizer's eps, typically because the layer fits its training data, so gradients are no longer "
                   "noise-dominated); their measured angles are expected to fall below the prediction.</p>")
    rows = "".join(
        f"<tr><td><code>{esc(r['layer'])}</code></td><td class='num'>{int(r['n_groups'])}</td>"
        f"<td class='num'>{fmt(float(r['angle_ratio']))}</td><td class='num'>{fmt(float(r['update_ratio']))}</td>"
        f"<td>{'n/a' if r['in_regime'] is None else 'yes' if r['in_regime'] else '<strong>no</strong>'}</td></tr>"
        for r in records)
    out.append("<table><tr><th>layer</th><th class='num'>groups</th><th class='num'>angle measured / predicted</th>"
               f"<th class='num'>update_ratio</th><th>in regime</th></tr>{rows}</table>")
    return "".join(out)


def symmetry_summary_html(view: RunView) -> str:
    """Groups per kind and per layer, the coverage card and the groups without a valid prediction."""
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
                    f"<td class='num'>{n}</td><td class='meta'>{esc(KINDS[k].charge)}</td></tr>"
                    for k, n in by_kind.items())
    kinds += f"<tr><th>total</th><th class='num'>{total}</th><th></th></tr>"
    layers = list(dict.fromkeys(lay for lay, _ in by_layer))
    layer_rows = "".join(
        f"<tr><td><code>{esc(lay)}</code></td>" + "".join(
            f"<td class='num'>{by_layer.get((lay, k), 0) or ''}</td>" for k in KINDS) + "</tr>" for lay in layers)
    layer_table = ("<table><tr><th>layer</th>" + "".join(f"<th class='num'>{k}</th>" for k in KINDS) + "</tr>"
                   + layer_rows + "</table>")
    invalid = view.invalid
    inv = ""
    if invalid:
        items = list(invalid.items())
        shown = "".join(f"<tr><td><code>{esc(n)}</code></td><td>{esc(r)}</td></tr>" for n, r in items[:200])
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
        rows += f"<tr><td><code>{esc(key)}</code></td><td class='num'>{int(n)}</td><td>{esc(why)}</td></tr>"
    table = (f"<table><tr><th>op</th><th class='num'>calls</th><th>why it blocks</th></tr>{rows}</table>" if rows
             else "<p class='meta'>no op blocked a moving channel</p>")
    loss = f"<p class='meta'>loss: {esc(meta['loss_detail'])}</p>" if meta.get("loss_detail") else ""
    return (f"<div class='card'><h3>Coverage</h3><p>{inside:,} of {total:,} parameter entries "
            f"(<strong>{100 * frac:.1f}%</strong>) are in at least one group.</p>{loss}"
            f"<h3>Ops that blocked channels</h3><div class='scroll'>{table}</div></div>")


def figure_html(r: Rendered) -> str:
    """One rendered figure as an inlined PNG with its caption, or the note of why it is not shown."""
    if r.png is None:
        return (f"<figure class='missing' id='fig-{r.key}'><strong>{esc(r.title)}</strong> — not shown: "
                f"{esc(r.reason)}</figure>")
    data = base64.b64encode(r.png).decode("ascii")
    return (f"<figure id='fig-{r.key}'><h3>{esc(r.title)}</h3><img alt='{esc(r.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{esc(r.caption)}</figcaption></figure>")
