"""A run as ONE self-contained HTML file: every figure embedded, no network, no external assets.

`write_report(run)` is what `nmech report RUN [--out FILE]` calls. The file holds: title and status,
the hyperparameters, a symmetry summary (groups per kind and per layer, groups the predictions do not
apply to and why), the error table (per kind, median and max relative error of each prediction at the
last logged step) and every figure the data allows, each PNG inlined as base64. A figure the data does
not allow is replaced by a short note that says why (e.g. "no weight decay, so no equilibrium"), so a
report is never silently incomplete. One file is easy to attach to an issue, archive or e-mail.

This module assembles the page: its style, header, run facts and the order of its sections. The figures are
plots/report_figures.py, the cards and tables plots/report_cards.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from neural_mechanics.errors import RunStoreError
from neural_mechanics.plots.report_cards import (
    applicability_html,
    equilibrium_html,
    error_table_html,
    esc,
    figure_html,
    fmt,
    kv_table,
    missing_predictions,
    symmetry_summary_html,
)
from neural_mechanics.plots.report_figures import Rendered, Section, render_figures
from neural_mechanics.plots.rotational import equilibrium_reason
from neural_mechanics.plots.source import load_run

__all__ = ["Rendered", "Section", "missing_predictions", "render_figures", "report_html", "write_report"]


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
    notes_html = ("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else ""
    versions = view.manifest.get("versions") or {}
    status = esc(view.status)
    missing = [r for r in rendered if r.png is None]
    nav = " · ".join(f"<a href='#fig-{r.key}'>{esc(r.title.split(':')[0])}</a>" for r in rendered)
    config_html = (f"<div class='card'><h3>Config</h3>{kv_table(cfg)}</div>"
                   if isinstance(cfg, Mapping) and cfg else "")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{esc(title)}<span class='badge {status}'>{status}</span></h1>",
        f"<div class='meta'>generated {esc(time.strftime('%Y-%m-%d %H:%M'))} by neural-mechanics"
        f"{' · ' + str(len(missing)) + ' figure(s) not available' if missing else ''}</div>",
        f"<div class='meta'>{nav}</div></header>",
        "<h2>Run</h2><div class='grid'>",
        f"<div class='card'><h3>Summary</h3>{kv_table(facts)}</div>",
        f"<div class='card'><h3>Hyperparameters</h3>{kv_table(view.hyper)}</div>",
        config_html,
        "</div>",
        "<h2>Symmetries</h2>", symmetry_summary_html(view),
        "<h2>Prediction error</h2>", applicability_html(view), error_table_html(view),
        "<h2>Equilibrium</h2>" if equilibrium_reason(view) else "", equilibrium_html(view),
        "<h2>Figures</h2>", *(figure_html(r) for r in rendered),
        notes_html,
        f"<footer>versions: {fmt(versions) if versions else 'not recorded'}</footer>",
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
