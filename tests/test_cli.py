"""The `nmech` command line: each command end to end, through the console-script entry point."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from neural_mechanics import SymmetrySet, cli


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `nmech ARGS` in-process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nmech", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_symmetries_json_is_the_public_contract(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "symmetries", "mlp-bn", "--json")
    assert code == 0
    data = json.loads(out)
    assert isinstance(data, list) and data
    for item in data:
        assert {"kind", "name", "members"} <= set(item)
        assert item["kind"] in ("translation", "scale", "rescale")
        for m in item["members"]:
            assert set(m) == {"param", "dim", "index", "role"}
    found = SymmetrySet.from_json(out)
    # mlp-bn: every hidden BatchNorm'd unit gives a scale and a rescale group; the classifier gives translations
    counts = found.counts()
    assert counts["scale"] > 0 and counts["rescale"] > 0 and counts["translation"] > 0
    assert counts["scale"] == counts["rescale"]


def test_symmetries_table_certifies_and_explain_prints_the_chain(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "symmetries", "digits-vgg-bn")
    assert code == 0
    assert "total" in out and "all actions leave the loss unchanged" in out
    code, out, _ = run(monkeypatch, capsys, "symmetries", "digits-vgg-bn", "--json")
    name = next(s["name"] for s in json.loads(out) if s["kind"] == "rescale")
    code, out, _ = run(monkeypatch, capsys, "symmetries", "digits-vgg-bn", "--explain", name)
    assert code == 0 and "rescale symmetry" in out and "why" in out and "(A2)" in out


def test_explain_unknown_group_is_a_clear_error(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "symmetries", "mlp-bn", "--explain", "nope")
    assert code == 2 and "no symmetry named" in err and "what to do" in err


def test_eval_mode_has_no_scale_groups_and_warns(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "symmetries", "mlp-bn", "--eval", "--no-certify")
    assert code == 0
    assert "warning" in err.lower() and "eval" in err.lower()
    code, out, _ = run(monkeypatch, capsys, "symmetries", "mlp-bn", "--eval", "--json")
    counts = SymmetrySet.from_json(out).counts()
    assert counts["scale"] == 0 and counts["translation"] > 0


def test_check_reports_constraints_and_exits_zero(monkeypatch, capsys, tmp_path):
    csv = tmp_path / "c.csv"
    code, out, _ = run(monkeypatch, capsys, "check", "mlp-bn", "--csv", str(csv))
    assert code == 0, out
    assert "all constraints hold" in out
    import pandas as pd

    df = pd.read_csv(csv)
    assert (df["grad_rel"] <= 1e-6).all()
    assert (df["grad_rel_random"].median() > 1e-4)


def test_check_fails_when_a_constraint_is_violated(monkeypatch, capsys):
    # an absurd tolerance below float64 rounding makes every group "violate": exit status 1
    code, _, err = run(monkeypatch, capsys, "check", "mlp-bn", "--no-hessian", "--grad-tol", "-1")
    assert code == 1 and "violate" in err


def test_bad_model_spec_and_input_shape(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "symmetries", "torchvision:resnet_eighteen")
    assert code == 2 and "what to do" in err
    code, _, err = run(monkeypatch, capsys, "symmetries", "digits-vgg-bn", "--input-shape", "3,a")
    assert code == 2 and "input-shape" in err
    code, _, err = run(monkeypatch, capsys, "symmetries", "digits-vgg-bn", "--input-shape", "3,64,64")
    assert code == 2 and "what to do" in err


def test_presets_and_configs_list(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "presets")
    assert code == 0 and "vgg16-bn-tinyimagenet" in out
    code, out, _ = run(monkeypatch, capsys, "configs")
    assert code == 0 and "demo" in out


def test_help_shows_no_bool_noise(monkeypatch, capsys):
    """Flags take no value, so --help shows none after them (typer would print `<bool>`)."""
    for command in ([], ["train"], ["symmetries"], ["check"], ["report"], ["demo"], ["presets"]):
        code, out, _ = run(monkeypatch, capsys, *command, "--help")
        assert code == 0 and "--help" in out and "Show this message" in out, command
        assert "<bool>" not in out, command
    code, out, _ = run(monkeypatch, capsys, "symmetries", "--help")
    assert "--no-certify" in out and "--json" in out and "<int>" in out  # typed options keep their type


@pytest.mark.slow
def test_demo_end_to_end(monkeypatch, capsys, tmp_path):
    torch.set_num_threads(1)
    code, out, err = run(monkeypatch, capsys, "demo", "--out", str(tmp_path), "--steps", "40")
    assert code == 0, err
    report = tmp_path / "run" / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    assert "largest relative error" in out
    # a second demo into the same place replaces the first (it is the demo's own output)
    code, _, err = run(monkeypatch, capsys, "demo", "--out", str(tmp_path), "--steps", "10")
    assert code == 0, err


@pytest.mark.slow
def test_train_then_report_with_a_comparison_run(monkeypatch, capsys, tmp_path):
    torch.set_num_threads(1)
    for name, momentum in (("mom", "0.9"), ("sgd", "0.0")):
        code, _, err = run(monkeypatch, capsys, "train", "demo", "--run-dir", str(tmp_path / name),
                           "--set", "steps=10", "--set", f"optimizer.momentum={momentum}", "--set", "eval_every=0")
        assert code == 0, err
    other = f"no momentum={tmp_path / 'sgd'}"
    code, _, err = run(monkeypatch, capsys, "report", str(tmp_path / "mom"), "--compare", other)
    assert code == 0, err
    html = (tmp_path / "mom" / "report.html").read_text()
    assert "no momentum" in html
    code, _, err = run(monkeypatch, capsys, "report", str(tmp_path / "mom"), "--compare", "nolabel")
    assert code == 2 and "LABEL=RUN_DIR" in err
