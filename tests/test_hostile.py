"""Hostile input, met where a user meets it (the `nmech` console script, in-process): each case ends in a clear error
(exit status 2, a message with "what to do", no traceback) or a documented degradation, and nothing already written
is lost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neural_mechanics.experiments.rundir import CHECKPOINT
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.store import open_run
from test_train import assert_user_error, make_tiny_imagenet, nmech, tiny_cfg, tiny_overrides

torch.set_num_threads(1)


def train_args(run_dir: Path, *extra: str, resume: bool = False) -> list[str]:
    sets = [a for o in tiny_overrides(*extra) for a in ("--set", o)]
    return ["train", "demo", *sets, "--run-dir", str(run_dir), *(["--resume"] if resume else [])]


def snapshot(path: Path) -> dict[str, str]:
    """Content hash of every file under `path` (to prove nothing was changed)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def stopped_run(tmp_path: Path, *extra: str, steps: int = 10) -> Path:
    """A run stopped after `steps` steps with a checkpoint there (as if killed right after it)."""
    run_dir = tmp_path / "run"
    run_training(tiny_cfg("steps=20", *extra), run_dir=run_dir, progress=False, stop_after=steps)
    return run_dir


# ---- divergence -----------------------------------------------------------------------------------------------


def test_huge_learning_rate_stops_with_a_clear_message_and_keeps_rows(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "optimizer.lr=1e6", "tracker.log_every=1",
                                                           "steps=30"))
    assert_user_error(code, err, "lower optimizer.lr")
    assert "non-finite" in err or "loss became" in err
    run = open_run(run_dir)
    assert run.status == "failed" and any("Diverged" in n for n in run.manifest["notes"])
    df = run.frame()
    assert len(df) > 0 and np.isfinite(df["measured"]).all()  # rows up to the failure, none of them garbage


# ---- the run store ---------------------------------------------------------------------------------------------


def test_truncated_last_part_is_skipped_with_a_warning_and_resume_finishes(tmp_path, monkeypatch, capsys):
    run_dir = stopped_run(tmp_path)
    parts = sorted((run_dir / "charges").glob("part-*.parquet"))
    parts[-1].write_bytes(parts[-1].read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="corrupt or truncated last part"):
        open_run(run_dir).frame()
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20", resume=True))
    assert code == 0, err
    assert open_run(run_dir).status == "finished"


def test_corrupt_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch, capsys):
    run_dir = stopped_run(tmp_path)
    ckpt = run_dir / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    before = snapshot(run_dir)
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20", resume=True))
    assert_user_error(code, err, "cannot be loaded safely")
    assert snapshot(run_dir) == before


def test_checkpoints_load_only_with_weights_only_and_code_is_never_run(tmp_path, monkeypatch, capsys):
    run_dir = stopped_run(tmp_path)
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)  # what we write loads safely
    assert state["step"] == 10
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "optimizer": {}, "step": 0, "payload": _Evil(str(marker))}, run_dir / CHECKPOINT)
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20", resume=True))
    assert_user_error(code, err, "weights_only=True")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_unreadable_manifest_is_a_clear_error(tmp_path, monkeypatch, capsys):
    run_dir = stopped_run(tmp_path)
    (run_dir / "manifest.json").write_text("{not json")
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20", resume=True))
    assert_user_error(code, err, "manifest.json is unreadable")


def test_missing_manifest_degrades_to_a_new_one_and_rows_survive(tmp_path, monkeypatch, capsys):
    """Documented degradation: resume rebuilds a missing manifest from the config; the stored rows stay."""
    run_dir = stopped_run(tmp_path)
    rows = open_run(run_dir).frame()
    (run_dir / "manifest.json").unlink()
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20", resume=True))
    assert code == 0, err
    after = open_run(run_dir).frame()
    old = after[after["step"] < 10].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, rows[rows["step"] < 10].reset_index(drop=True))
    assert after["step"].max() == 20


def test_read_only_run_directory(tmp_path, monkeypatch, capsys):
    run_dir = stopped_run(tmp_path)
    before = snapshot(run_dir)
    fresh = tmp_path / "ro-parent" / "new"
    fresh.parent.mkdir()
    if os.geteuid() != 0:
        os.chmod(run_dir, 0o555)
        os.chmod(fresh.parent, 0o555)
    else:  # root ignores permission bits: simulate the file system refusing writes below these directories
        real_open = os.open
        ro = (str(run_dir), str(fresh.parent))

        def deny(path, flags, *args, **kwargs):
            if str(path).startswith(ro) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny)
        real_mkdir = Path.mkdir

        def deny_mkdir(self, *args, **kwargs):
            if str(self).startswith(ro) and not self.exists():
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", deny_mkdir)
    try:
        code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20", resume=True))
        assert_user_error(code, err, "not writable")
        code, _, err = nmech(monkeypatch, capsys, *train_args(fresh, "steps=20"))
        assert_user_error(code, err, "not writable")
    finally:
        if os.geteuid() != 0:
            os.chmod(run_dir, 0o755)
            os.chmod(fresh.parent, 0o755)
    monkeypatch.undo()
    assert snapshot(run_dir) == before
    assert not fresh.exists()


@pytest.mark.filterwarnings("ignore:could not mark the run failed")
def test_full_disk_stops_the_run_and_flushed_rows_stay_readable(tmp_path, monkeypatch, capsys):
    from neural_mechanics.tracking import store

    run_training(tiny_cfg("steps=40", "checkpoint_every=10"), run_dir=tmp_path / "ref", progress=False)
    ref = open_run(tmp_path / "ref").frame()
    real = store.atomic_write_table
    calls = {"n": 0}

    def write_until_full(path, table, *options):
        calls["n"] += 1
        if calls["n"] > 8:  # two checkpoints' flushes (steps + charges + layers + metrics), then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, table, *options)

    monkeypatch.setattr(store, "atomic_write_table", write_until_full)
    run_dir = tmp_path / "run"
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=40", "checkpoint_every=10"))
    assert_user_error(code, err, "is full", "free disk space")
    monkeypatch.undo()
    run = open_run(run_dir)
    assert run.status == "failed"
    df = run.frame()
    assert len(df) > 0
    merged = df.merge(ref, on=["step", "group"], suffixes=("", "_ref"))
    assert len(merged) == len(df)
    assert np.array_equal(merged["measured"], merged["measured_ref"])
    assert np.array_equal(merged["predicted_exact"], merged["predicted_exact_ref"], equal_nan=True)


def test_full_disk_while_checkpointing(tmp_path, monkeypatch, capsys):
    def no_space(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed (No space left on device)")

    monkeypatch.setattr(torch, "save", no_space)
    run_dir = tmp_path / "run"
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20"))
    assert_user_error(code, err, "is full")
    monkeypatch.undo()
    assert open_run(run_dir).status == "failed"
    assert not list(run_dir.glob(".checkpoint.pt.tmp-*"))


# ---- what the user asked for -----------------------------------------------------------------------------------


def test_wrong_dataset_layout(tmp_path, monkeypatch, capsys):
    tiny = make_tiny_imagenet(tmp_path / "data")
    (tiny / "wnids.txt").unlink()
    code, _, err = nmech(monkeypatch, capsys, "train", "vgg16-bn-tinyimagenet-sgd-wd5e-4", "--run-dir",
                         str(tmp_path / "run"), "--set", f"dataset.root={tmp_path / 'data'}", "--set", "steps=1")
    assert_user_error(code, err, "wnids.txt")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_nonexistent_model_spec(tmp_path, monkeypatch, capsys):
    code, _, err = nmech(monkeypatch, capsys, *train_args(tmp_path / "run", "model=mlpp"))
    assert_user_error(code, err, "mlp")  # a close match is suggested
    code, _, err = nmech(monkeypatch, capsys, *train_args(tmp_path / "run", "model=no_such_pkg.models:net"))
    assert_user_error(code, err)


UNCAPTURABLE = '''
import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


class Opaque(nn.Module):
    """Trains fine eagerly; refuses every tracer (a stand-in for a custom kernel without a tracing rule)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.l = nn.Linear(64, num_classes)

    def forward(self, x):
        if _get_current_function_mode_stack() or _get_current_dispatch_mode_stack() or type(x) is not torch.Tensor:
            raise RuntimeError("custom kernel 'fancy_op' has no tracing rule")
        return self.l(x.flatten(1))


def opaque(num_classes=10):
    return Opaque(num_classes)


class FrozenBN(nn.Module):
    """An MLP whose BatchNorm stays in eval mode while training (running statistics, as when fine-tuning)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)

    def train(self, mode=True):
        super().train(mode)
        self.net[2].eval()
        return self


def frozen_bn(num_classes=10):
    return FrozenBN(num_classes)
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(UNCAPTURABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_models"


def test_model_that_cannot_be_captured(tmp_path, monkeypatch, capsys, user_models):
    code, _, err = nmech(monkeypatch, capsys, *train_args(tmp_path / "run", f"model={user_models}:opaque"))
    assert_user_error(code, err, "cannot analyse model", "tracker.enabled=false")
    # the suggested fix works
    code, _, err = nmech(monkeypatch, capsys, *train_args(tmp_path / "run2", f"model={user_models}:opaque",
                                                           "tracker.enabled=false", "steps=4"))
    assert code == 0, err
    assert open_run(tmp_path / "run2").status == "finished"


def test_eval_mode_batchnorm_is_tracked_without_scale_symmetries(tmp_path, monkeypatch, capsys, user_models):
    """Documented degradation: BatchNorm frozen in eval mode is an affine map, so the layer before it has no scale
    symmetry; the tracker tracks what remains (here the exact predictions still hold)."""
    code, _, err = nmech(monkeypatch, capsys, *train_args(tmp_path / "run", f"model={user_models}:frozen_bn",
                                                           "steps=10"))
    assert code == 0, err
    df = open_run(tmp_path / "run").frame()
    assert "scale" not in set(df["kind"]) and len(df) > 0
    v = df[df["valid"]]
    assert ((v["predicted_exact"] - v["measured"]).abs() / v["norm"]).max() < 1e-5


def test_adam_predictions_not_applicable_and_breaking_term_measured(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "optimizer.name=adam", "optimizer.momentum=0",
                                                           "optimizer.lr=0.001", "steps=10"))
    assert code == 0, err
    run = open_run(run_dir)
    verdicts = run.manifest["applicability"]  # Adam's strategy (docs/theory.md section 6): no conservation law,
    assert not verdicts["predicted_exact"]["applies"] and "adaptive" in verdicts["predicted_exact"]["reason"]
    assert not verdicts["predicted_paper"]["applies"]  # no continuous model,
    assert verdicts["predicted_breaking"]["applies"]  # but the exact step identity with u from the optimizer state
    df = run.frame()
    assert df["predicted_exact"].isna().all() and df["predicted_paper"].isna().all()
    assert df.loc[df["valid"], "predicted_breaking"].notna().all()
    stepped = df[df["step"] < 10]["breaking_term"]  # the final row (theta_10, no step after it) has none
    assert np.isfinite(stepped).all() and (stepped != 0).any()


def test_mixed_hyperparameters_inside_one_group_invalidate_only_that_group(tmp_path):
    """Two param groups with different lr split the rescale groups of the first hidden layer (its weight rows and
    biases in one, the next layer's weight columns in the other): those groups are flagged, the rest stay exact."""
    from neural_mechanics.experiments.models import mlp
    from neural_mechanics.symmetry.detect import find_symmetries
    from neural_mechanics.tracking.tracker import Tracker

    torch.manual_seed(0)
    model = mlp(hidden=(16, 16))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    syms = find_symmetries(model, x)
    first = [p for n, p in model.named_parameters() if n.startswith(("net.1.", "net.3.weight"))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("net.1.", "net.3.weight"))]
    opt = torch.optim.SGD([{"params": first[:2], "lr": 0.1}, {"params": first[2:] + rest, "lr": 0.05}], momentum=0.9)
    with Tracker(model, opt, syms, tmp_path / "run", log_every=1) as tracker:
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert tracker.step == 5
    run = open_run(tmp_path / "run")
    df = run.frame()
    split = {s.name for s in syms if s.kind == "rescale" and {m.param for m in s.members} >= {"net.1.weight",
                                                                                             "net.3.weight"}}
    assert len(split) == 16
    assert set(run.invalid) >= split and all("different lr" in run.invalid[g] for g in split)
    bad = df[df["group"].isin(split)]
    assert (~bad["valid"]).all() and bad["predicted_exact"].isna().all()
    good = df[df["valid"]]
    assert len(good) > 0
    assert ((good["predicted_exact"] - good["measured"]).abs() / good["norm"]).max() < 1e-5


# ---- configs ----------------------------------------------------------------------------------------------------


def test_config_file_with_unknown_key_or_wrong_type(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: mlp\nsteps: 5\noptimzer:\n  lr: 0.1\n")
    code, _, err = nmech(monkeypatch, capsys, "train", str(bad), "--run-dir", str(tmp_path / "run"))
    assert_user_error(code, err, "optimzer", "did you mean optimizer")
    bad.write_text("name: x\nmodel: mlp\nsteps: 5\nbatch_size: many\n")
    code, _, err = nmech(monkeypatch, capsys, "train", str(bad), "--run-dir", str(tmp_path / "run"))
    assert_user_error(code, err, "batch_size", "int")
    code, _, err = nmech(monkeypatch, capsys, "train", "demo", "--set", "tracker.log_evry=3")
    assert_user_error(code, err, "log_every")
    assert not (tmp_path / "run").exists()


def test_resume_of_nothing_and_double_start_are_clear(tmp_path, monkeypatch, capsys):
    code, _, err = nmech(monkeypatch, capsys, *train_args(tmp_path / "nope", resume=True))
    assert_user_error(code, err, "does not exist")
    run_dir = stopped_run(tmp_path)
    before = snapshot(run_dir)
    code, _, err = nmech(monkeypatch, capsys, *train_args(run_dir, "steps=20"))
    assert_user_error(code, err, "already holds a run", "--resume")
    assert snapshot(run_dir) == before
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running"
