"""Crash safety: SIGKILL `nmech train` at random moments, check the run directory after each kill, resume to the end.

After every kill: the run directory opens (`open_run(...).frame()`), every row in it is bit-for-bit the row an
uninterrupted run writes for that (step, group) (nothing half-written, nothing from a diverged trajectory), and the
checkpoint (if any) loads with weights_only=True. `--resume` then continues; the finished run equals the
uninterrupted one (predictions to <= 1e-9 relative, in fact exactly).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neural_mechanics.experiments.checkpoint import load_checkpoint
from neural_mechanics.experiments.rundir import CHECKPOINT
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.store import open_run
from test_train import assert_same_run, tiny_cfg, tiny_overrides

torch.set_num_threads(1)

CRASH = ("steps=300", "tracker.log_every=3", "checkpoint_every=25", "eval_every=50")
KEY = ["step", "group"]


def _cmd(run_dir: Path, resume: bool) -> list[str]:
    sets = [a for o in tiny_overrides(*CRASH) for a in ("--set", o)]
    return [sys.executable, "-m", "neural_mechanics.cli", "train", "demo", *sets, "--run-dir", str(run_dir),
            *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _kill_at_random(run_dir: Path, resume: bool, delay: float) -> int:
    """Start `nmech train` and SIGKILL it `delay` seconds after it (re)wrote its manifest, i.e. once it has set up
    its run and is about to train (or when it has ended)."""
    manifest = run_dir / "manifest.json"
    stamp = manifest.stat().st_mtime_ns if manifest.exists() else None
    proc = subprocess.Popen(_cmd(run_dir, resume), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if manifest.exists() and manifest.stat().st_mtime_ns != stamp:
            break
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode


def _assert_rows_are_reference_rows(run_dir: Path, ref: pd.DataFrame) -> int:
    df = open_run(run_dir).frame()
    if df.empty:
        return 0
    assert not df.duplicated(KEY).any()
    merged = df.merge(ref, on=KEY, how="left", suffixes=("", "_ref"), indicator=True)
    assert (merged["_merge"] == "both").all(), "rows that an uninterrupted run does not write"
    for col in ("measured", "predicted_exact", "predicted_breaking", "predicted_paper", "norm"):
        a, b = merged[col].to_numpy(), merged[f"{col}_ref"].to_numpy()
        assert np.array_equal(a, b, equal_nan=True), col
    return len(df)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    ref_dir = tmp_path / "ref"
    run_training(tiny_cfg(*CRASH), run_dir=ref_dir, progress=False)
    ref = open_run(ref_dir).frame()

    run_dir = tmp_path / "crash"
    rng = random.Random(20210112)
    killed, resume = 0, False
    for _attempt in range(3):
        code = _kill_at_random(run_dir, resume, rng.uniform(0.0, 2.5))
        killed += code == -signal.SIGKILL
        assert open_run(run_dir).manifest["schema_version"] >= 1
        _assert_rows_are_reference_rows(run_dir, ref)
        if (run_dir / CHECKPOINT).exists():
            state = load_checkpoint(run_dir / CHECKPOINT)  # weights_only=True
            assert state["step"] % 25 == 0
        resume = True
    assert killed >= 1, "no kill landed inside a run: the drill tested nothing"
    done = subprocess.run(_cmd(run_dir, True), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert open_run(run_dir).status == "finished"

    final, expect = open_run(run_dir).frame(), ref
    assert len(final) == len(expect)
    for col in ("measured", "predicted_exact", "predicted_breaking", "predicted_paper"):
        a, b = final[col].to_numpy(), expect[col].to_numpy()
        rel = np.abs(a - b) / np.maximum(np.abs(expect["norm"].to_numpy()), 1e-300)
        assert np.nanmax(rel) <= 1e-9, col
    assert_same_run(ref_dir, run_dir)


def test_a_kill_during_a_flush_leaves_only_hidden_temp_files(tmp_path):
    """What a kill inside an atomic write leaves behind (a half-written temp file, a stale checkpoint temp file) is
    invisible to readers, and resume cleans the checkpoint one up."""
    cfg = tiny_cfg("steps=20")
    run_dir = tmp_path / "r"
    run_training(cfg, run_dir=run_dir, progress=False, stop_after=10)
    before = open_run(run_dir).frame()
    (run_dir / "charges" / ".part-000099.parquet.tmp-12345").write_bytes(b"PAR1 half a file")
    (run_dir / f".{CHECKPOINT}.tmp-12345").write_bytes(b"half a checkpoint")
    pd.testing.assert_frame_equal(before, open_run(run_dir).frame())
    run_training(cfg, run_dir=run_dir, resume=True, progress=False)
    assert not list(run_dir.glob(f".{CHECKPOINT}.tmp-*"))
    assert open_run(run_dir).status == "finished"
