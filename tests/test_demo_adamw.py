"""`nmech demo --optimizer adamw`: the pipeline on the shipped config digits-adamw-noisy (short run)."""

from __future__ import annotations

import re

import pytest
import torch

from test_cli import run


@pytest.mark.slow
def test_demo_adamw_end_to_end(monkeypatch, capsys, tmp_path):
    torch.set_num_threads(1)
    code, out, err = run(monkeypatch, capsys, "demo", "--optimizer", "adamw", "--out", str(tmp_path), "--steps", "30")
    assert code == 0, err
    # float32 training: the exact step identity holds to float rounding (issue 14: <= 1e-5 in float32)
    found = re.search(r"exact step identity over all groups and steps: ([0-9.e+-]+)", " ".join(out.split()))
    assert found and float(found.group(1)) <= 1e-5, out
    assert "measured / predicted" in out
    html = (tmp_path / "run" / "report.html").read_text()
    assert "AdamW: rotational equilibrium" in html and "<figure id='fig-rotational'>" in html


def test_demo_with_an_unknown_optimizer_exits_2(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "demo", "--optimizer", "lamb", "--out", str(tmp_path))
    assert code == 2 and "use one of sgd, adamw" in " ".join(err.split())
