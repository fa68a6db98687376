"""The HTML report: self-contained, complete where the data allows, honest where it does not, and it
renders in a real browser (headless Chromium: every <img> decodes to a non-empty picture)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from neural_mechanics.plots import figures as F
from neural_mechanics.plots.report import report_html, write_report
from neural_mechanics.plots.source import load_run
from synthetic_runs import synthetic_run

SMALL_LAYERS = (("f.0", "scale", 4, 10), ("f.1", "rescale", 4, 2 + 8), ("f.3", "scale", 5, 9),
                ("c.0", "translation", 6, 4))
IMG = re.compile(r"<img [^>]*src='([^']*)'")


@pytest.fixture(scope="module")
def run():
    return synthetic_run(steps=50, layers=SMALL_LAYERS, weight_decay=2e-2)


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report.html"
    path = write_report(run, out, compare={"momentum 0.9": synthetic_run(steps=50, layers=SMALL_LAYERS,
                                                                         momentum=0.9, weight_decay=2e-2)})
    return path


def _decode_pngs(text):
    import matplotlib.image as mpimg

    srcs = IMG.findall(text)
    images = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        images.append(mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png"))
    return images


def test_report_is_self_contained_and_has_every_section(report, run):
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", text)  # no external assets
    assert "<script" not in text and "<link" not in text and "@import" not in text
    for heading in ("Hyperparameters", "Symmetries", "Prediction error", "Figures", "Groups per kind",
                    "Groups per layer"):
        assert heading in text
    images = _decode_pngs(text)
    # training, charges, errors, norms, equilibrium, constraints (the synthetic run carries a report), toy
    assert len(images) == 7
    assert all(im.ndim == 3 and im.shape[0] > 100 and im.shape[1] > 100 for im in images)
    assert all(np.ptp(im[..., :3]) > 0.5 for im in images)  # not blank
    assert "not shown" not in text


def test_report_tables_hold_the_runs_numbers(report, run):
    text = html.unescape(report.read_text())
    assert "<span class='badge complete'>complete</span>" in text
    assert "<th>weight_decay</th><td>0.02</td>" in text and "<th>optimizer</th><td>SGD</td>" in text
    g = run.frame()
    n = g.drop_duplicates("group")["kind"].value_counts()
    for kind in ("translation", "scale", "rescale"):
        assert re.search(rf"{kind}</td><td class='num'>{n[kind]}</td>", text)
    table = F.error_table(run)
    for kind, row in table.iterrows():
        value = row["exact + measured breaking max"]
        assert f"{value:.2e}" in text or f"{value:.3g}" in text, kind
    assert "<code>f.1</code>" in text  # the per-layer table names layers


def test_report_says_why_figures_are_missing():
    df = synthetic_run(steps=20, layers=(("c.0", "translation", 3, 4),), weight_decay=0.0).frame()

    class Bare:
        def frame(self):
            return df

    text = report_html(Bare())
    for reason in ("no metrics data", "no scale symmetries", "no constraint report"):
        assert reason in text
    assert len(IMG.findall(text)) == 3  # charges, errors, toy


def test_report_from_run_directory_written_by_the_store(tmp_path, run):
    from neural_mechanics.symmetry.groups import SymmetrySet
    from neural_mechanics.tracking.store import RunWriter

    writer = RunWriter(tmp_path / "r", config=run.manifest["config"], hyperparameters=run.manifest["hyperparameters"],
                       symmetries=SymmetrySet.from_json(json.dumps(run.symmetries)))
    writer.append("groups", {c: run.frame()[c].to_numpy() for c in run.frame().columns})
    writer.append("layers", {c: run.layers()[c].to_numpy() for c in run.layers().columns})
    writer.append("metrics", {c: run.metrics()[c].to_numpy() for c in run.metrics().columns})
    writer.mark_invalid("f.0:bogus", "members sit in param groups [0, 1] with different weight_decay")
    writer.flush()
    writer.set_status("complete")
    view = load_run(tmp_path / "r")
    assert view.path == tmp_path / "r" and view.hyper["weight_decay"] == 2e-2
    assert len(view.symmetries) == len(run.symmetries)
    out = write_report(tmp_path / "r")
    assert out == tmp_path / "r" / "report.html"
    text = out.read_text()
    assert "Groups without a valid prediction (1)" in text and "different weight_decay" in text
    assert len(IMG.findall(text)) == 6  # all but constraints (not on disk); norms per-filter only


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not found (install: apt-get install -y chromium)")
    # the report has no script; a copy with one appended reports each image's decoded width
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load', () => {const w = Array.from(document.images)"
             ".map(i => i.complete ? i.naturalWidth : -1); document.body.setAttribute('data-widths', "
             "JSON.stringify(w));});</script>")
    probe.write_text(report.read_text().replace("</body>", check + "</body>"))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'data-widths="([^"]*)"', proc.stdout)
    assert m, f"no marker in the DOM; chromium stderr tail: {proc.stderr[-500:]}"
    widths = json.loads(html.unescape(m.group(1)))
    assert len(widths) == len(IMG.findall(report.read_text())) == 7
    assert all(w > 0 for w in widths), widths


@pytest.mark.slow
def test_report_of_a_real_tracked_run(tmp_path):
    """Train a tiny BN + ReLU net with the Tracker, then report from its run directory."""
    import torch
    from torch import nn

    from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
    from neural_mechanics.tracking.tracker import Tracker

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, eps=1e-10), nn.ReLU(), nn.Linear(8, 3))
    syms = [Symmetry("scale", f"scale:0:{c}", (Member("0.weight", 0, (c,)), Member("0.bias", 0, (c,))))
            for c in range(8)]
    syms += [Symmetry("rescale", f"rescale:1:{c}", (Member("1.weight", 0, (c,), "in"),
                                                    Member("1.bias", 0, (c,), "in"),
                                                    Member("3.weight", 1, (c,), "out"))) for c in range(8)]
    syms += [Symmetry("translation", f"translation:3:{j}", (Member("3.weight", 1, (j,)),)) for j in range(8)]
    syms += [Symmetry("translation", "translation:3:bias", (Member("3.bias"),))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    run_dir = tmp_path / "run"
    with Tracker(model, opt, SymmetrySet(syms), run_dir, log_every=1, config={"name": "tiny"}) as tracker:
        for k in range(40):
            idx = torch.randint(0, 256, (32,))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            tracker.log_metrics(k, loss=loss.item())
    out = write_report(run_dir, tmp_path / "report.html")
    text = out.read_text()
    assert len(IMG.findall(text)) == 6, re.findall(r"not shown: [^<]*", text)
    table = F.error_table(run_dir)
    assert set(table.index) == {"translation", "scale", "rescale"}
    # with the measured breaking carried, the exact recurrence matches the measured charges to float rounding
    assert (table["exact + measured breaking max"] < 1e-4).all(), table
    assert load_run(run_dir).hyper["momentum"] == 0.9
