"""`nmech groups / balance / equalize / distance / completeness` through the console-script entry point.

Each command is a thin library call: these tests check what it prints, what it writes (a state_dict that the
library then certifies), and that user errors exit 2 with what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import neural_mechanics as nm
from neural_mechanics.uses.balance import imbalance
from test_cli import run  # `nmech ARGS` in-process -> (exit code, stdout, stderr)
from uses_support import small_mlp

torch.set_num_threads(1)
MLP = "uses_support:small_mlp"  # a 4-8-8-3 BatchNorm ReLU MLP, bias-free before BN (tests/uses_support.py)


def test_groups_prints_the_split_and_the_disagreements(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "groups", MLP, "--weight-decay", "0.01", "--all")
    assert code == 0
    # by hand: the two hidden Linear weights (behind train-mode BN) are scale-invariant, 2 tensors / 96 entries
    row = next(line for line in out.splitlines() if "scale_invariant" in line)
    assert [c.strip() for c in row.split("│") if c.strip()] == ["scale_invariant", "2", "96", "0.01"]
    assert "2 x rows" in out
    # every rule decays / claims rows for the head weight 6.weight, which is not invariant: 1 disagreement each
    for rule in ("timm", "nanogpt", "rows"):
        assert f"{rule} (" in out and "1 disagreement(s) in 8 parameters" in out
    assert "6.weight" in out and "every parameter" in out


def test_balance_writes_a_balanced_state_dict_and_distance_finds_it(monkeypatch, capsys, tmp_path: Path):
    start = tmp_path / "start.pt"
    torch.save(small_mlp().state_dict(), start)
    balanced = tmp_path / "balanced.pt"
    code, out, _ = run(monkeypatch, capsys, "balance", MLP, "--checkpoint", str(start), "--out", str(balanced))
    assert code == 0 and "16 rescale groups" in out and "relative change of the outputs" in out
    model = small_mlp()
    model.load_state_dict(torch.load(balanced, weights_only=True))
    x = torch.randn(16, 4)
    sym = nm.find_symmetries(model, x)
    assert max(imbalance(model, sym).values()) < 1e-5  # float32 model: balanced to float32 rounding
    # the balanced checkpoint lies on the orbit of the start: distance up to symmetry ~ 0 (float32 rounding)
    aligned = tmp_path / "aligned.pt"
    code, out, _ = run(monkeypatch, capsys, "distance", MLP, str(start), str(balanced), "--out", str(aligned))
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("plain distance"))
    plain, up_to = float(line.split()[2].rstrip(";")), float(line.split()[6])
    assert plain > 0.1 and up_to < 1e-4 * plain
    assert aligned.exists()


def test_equalize_reports_quantisation_error_before_and_after(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "equalize", "digits-vgg", "--batch", "8")
    assert code == 0
    assert "rescale groups equalised" in out and "before" in out and "after" in out
    change = float(out.split("relative change of the float outputs:")[1].split()[0])
    assert change < 1e-5


def test_completeness_finds_all_on_a_bn_mlp(monkeypatch, capsys):
    # by hand: scale 8 + 8, rescale 8 + 8 (BN affine -> next columns), translations 8 + 1 = 41
    code, out, _ = run(monkeypatch, capsys, "completeness", MLP)
    assert code == 0 and "found 41 of 41" in out


def test_user_errors_exit_2(monkeypatch, capsys, tmp_path: Path):
    code, _, err = run(monkeypatch, capsys, "completeness", "mlp")  # 26k parameters: too many for a dense Jacobian
    assert code == 2 and "max_params" in err and "what to do" in err
    code, _, err = run(monkeypatch, capsys, "balance", MLP, "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 2 and "does not exist" in err
    wrong = tmp_path / "wrong.pt"
    torch.save({"0.weight": torch.zeros(2, 2)}, wrong)
    code, _, err = run(monkeypatch, capsys, "distance", MLP, str(wrong), str(wrong))
    assert code == 2 and "do not fit" in err


@pytest.mark.parametrize("command", ["groups", "balance", "equalize", "distance", "completeness"])
def test_help_explains(monkeypatch, capsys, command):
    code, out, _ = run(monkeypatch, capsys, command, "--help")
    assert code == 0 and "Usage" in out and "preset name" in out and "--seed" in out
