"""FSDP2 in `nmech train` (`--set distributed.strategy=fsdp2`).

Under torchrun (2 CPU processes, gloo, loopback), on a model whose row counts 2 ranks split unevenly, with an
RMSNorm and a residual stream (tests/fsdp_worker.py):
- measured charges and every prediction equal a single-process run with the same global batch (<= 1e-6 relative
  to the group's norm), for SGD with momentum and weight decay and for AdamW;
- a run SIGKILLed (torchrun and both workers at once) after its first checkpoint and resumed equals the
  uninterrupted run bit for bit.
In one process (fast): the sharded checkpoint directory's rules (the newest complete directory wins, temp
directories are ignored and removed, older ones are deleted after a save), resume equality (with the parameter
trace) for both checkpoint formats, that the optimizer step torch.distributed.checkpoint runs to create a
stateless optimizer's state is not seen by the step hooks, and the config key.

The 2-process runs are launched as few times as possible (each launch costs tens of seconds): the uninterrupted
runs are shared by both slow tests when they run in the same process.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

import neural_mechanics as nm
from fsdp_worker import ARGS, RUNS
from neural_mechanics.errors import ConfigError
from neural_mechanics.experiments.checkpoint import config_mismatch, load_checkpoint
from neural_mechanics.experiments.config import config_to_dict
from neural_mechanics.experiments.fsdp import step_hooks_suspended
from neural_mechanics.experiments.rundir import SHARDED_STATE, sharded_checkpoints
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker
from test_train import tiny_cfg, tiny_overrides

torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
PREDICTIONS = ("predicted_exact", "predicted_breaking", "predicted_paper")
_LAUNCHED: dict[str, Path] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONFAULTHANDLER="1",
                PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *args]


def _nmech_train(run_dir: Path, *extra: str) -> list[str]:
    sets = [a for o in tiny_overrides(*ARGS, *RUNS["sgd"]) for a in ("--set", o)]
    return _torchrun("-m", "neural_mechanics.cli", "train", "demo", *sets, "--run-dir", str(run_dir), *extra)


def _uninterrupted(factory: pytest.TempPathFactory) -> Path:
    """The worker's FSDP2 runs (RUNS, one launch), once per test process."""
    if "root" not in _LAUNCHED:
        root = factory.mktemp("fsdp2")
        done = subprocess.run(_torchrun(str(TESTS / "fsdp_worker.py"), str(root)), env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        _LAUNCHED["root"] = root
    return _LAUNCHED["root"]


@pytest.mark.slow
def test_fsdp2_on_two_ranks_equals_one_process_with_the_global_batch(tmp_path_factory, tmp_path):
    root = _uninterrupted(tmp_path_factory)
    single_args = [a for a in ARGS if not a.startswith("distributed.")]
    for name, extra in RUNS.items():
        run_training(tiny_cfg(*single_args, *extra), run_dir=tmp_path / name, progress=False)
        sharded = open_run(root / name)
        assert sharded.status == "finished"
        assert sharded.manifest["tracker"]["sharded"] is True
        dist = sharded.manifest["distributed"]
        assert dist["world_size"] == 2 and dist["strategy"] == "fsdp2"
        assert dist["rank_disagreement"] == 0.0  # every rank advanced the same predictions
        assert [s for s, _ in sharded_checkpoints(root / name)] == [24]  # older checkpoints removed

        a, b = open_run(tmp_path / name).frame(), sharded.frame()
        assert len(a) == len(b) > 0 and (a["group"] == b["group"]).all() and (a["step"] == b["step"]).all()
        assert {"rescale", "translation"} <= set(a["kind"])
        norm = a["norm"].to_numpy()
        worst = {}
        for col in ("measured", *PREDICTIONS, "grad_norm"):
            x, y = a[col].to_numpy(), b[col].to_numpy()
            assert np.array_equal(np.isnan(x), np.isnan(y)), (name, col)
            if np.isfinite(x).any():
                # grad_norm is stored to 2^-16 of itself (tracking/precision.py): the runs' last-bit differences
                # may round it one step apart, so against itself
                scale = np.maximum(np.abs(x), 1e-30) if col == "grad_norm" else norm
                worst[col] = float(np.nanmax(np.abs(x - y) / scale))
                assert worst[col] <= (2.0 ** -15 + 1e-6 if col == "grad_norm" else 1e-6), (name, worst)
        x, y = a["breaking_term"].to_numpy(), b["breaking_term"].to_numpy()
        if name == "sgd":  # B_k = <v, g_k>: zero up to rounding for an exact symmetry, so against the group's norm
            worst["breaking_term"] = float(np.nanmax(np.abs(x - y) / norm))
            assert worst["breaking_term"] <= 1e-6, (name, worst)
        else:  # AdamW's <v, u_k>, u_k = (theta_k - theta_{k+1}) / eta_k: a difference of float32 parameters, so the
            # runs' last-bit differences (the measured charges above) are amplified by |theta| / |step| ~ 100:
            # against the group's largest |<v, u>| (measured 4e-5)
            scale = a.assign(s=np.abs(x)).groupby("group")["s"].transform("max").to_numpy()
            worst["breaking_term"] = float(np.nanmax(np.abs(x - y) / np.maximum(scale, 1e-30)))
            assert worst["breaking_term"] <= 1e-3, (name, worst)
        print(f"FSDP2 (2 ranks) vs one process, {name}, max relative difference:", worst)
        ma, mb = open_run(tmp_path / name).metrics(), sharded.metrics()
        assert (ma[["step", "split", "name"]].to_numpy() == mb[["step", "split", "name"]].to_numpy()).all()
        assert np.allclose(ma["value"], mb["value"], rtol=1e-5, atol=1e-6)  # losses, accuracies, eval included


@pytest.mark.slow
def test_fsdp2_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path_factory, tmp_path):
    """SIGKILL torchrun and both workers at once (as a lost node) some time after the first checkpoint, resume."""
    full = _uninterrupted(tmp_path_factory) / "sgd"
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(_nmech_train(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (run_dir / "checkpoint-00000008").is_dir() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(20240512).uniform(0.0, 1.0))
    assert proc.poll() is None, "the run ended before it could be killed: " + (proc.stderr.read().decode()
                                                                               if proc.stderr else "")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed = open_run(run_dir)
    assert killed.status != "finished"
    steps = [s for s, _ in sharded_checkpoints(run_dir)]
    assert steps and steps[-1] in (8, 16)
    state = load_checkpoint(sharded_checkpoints(run_dir)[-1][1])  # state.pt loads with weights_only=True
    assert state["step"] == steps[-1] and state["sharded"] is True and len(state["rng_ranks"]) == 2

    done = subprocess.run(_nmech_train(run_dir, "--resume"), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = open_run(full), open_run(run_dir)
    assert a.status == b.status == "finished"
    fa, fb = a.frame(), b.frame()
    assert len(fa) == len(fb) > 0 and fa["step"].max() == 24
    for col in ("measured", *PREDICTIONS, "breaking_term", "grad_norm", "norm"):
        assert np.array_equal(fa[col].to_numpy(), fb[col].to_numpy(), equal_nan=True), col
    assert np.array_equal(a.metrics()["value"].to_numpy(), b.metrics()["value"].to_numpy())
    assert [s for s, _ in sharded_checkpoints(run_dir)] == [24]
    assert not list(run_dir.glob(".checkpoint-*"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_in_one_process(tmp_path, strategy):
    """distributed.strategy=fsdp2 on one process keeps the sharded checkpoint format (so a run can change world
    size): the newest complete directory is resumed, a temp directory left by a kill is removed, older directories
    go after a save. Either format resumes to the uninterrupted run's rows and parameter trace (the trace samples
    theta at the resumed step only once the checkpoint is loaded)."""
    args = ("model=mlp-bn", "steps=20", "checkpoint_every=5", "tracker.log_every=2", "optimizer.momentum=0.0",
            f"distributed.strategy={strategy}")  # BatchNorm: scale groups, so the parameter trace records
    run_training(tiny_cfg(*args), run_dir=tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    run_training(tiny_cfg(*args), run_dir=cut, progress=False, stop_after=10)
    if strategy == "fsdp2":
        assert [s for s, _ in sharded_checkpoints(cut)] == [10]  # the one of step 5 was removed after step 10's
        assert not (cut / "checkpoint.pt").exists() and (cut / "checkpoint-00000010" / SHARDED_STATE).is_file()
        (cut / ".checkpoint-00000015.tmp").mkdir()  # a checkpoint being written when the run was killed
        (cut / ".checkpoint-00000015.tmp" / "__0_0.distcp").write_bytes(b"half")
    run_training(tiny_cfg(*args), run_dir=cut, progress=False, resume=True)
    a, b = open_run(tmp_path / "full").frame(), open_run(cut).frame()
    assert len(a) == len(b) and not b.duplicated(["step", "group"]).any()
    for col in ("measured", *PREDICTIONS):
        assert np.array_equal(a[col].to_numpy(), b[col].to_numpy(), equal_nan=True), col
    trace_a, trace_b = (pd.read_parquet(d / "param_trace.parquet") for d in (tmp_path / "full", cut))
    assert len(trace_a) > 0 and trace_a.equals(trace_b)
    if strategy == "fsdp2":
        assert not list(cut.glob(".checkpoint-*")) and [s for s, _ in sharded_checkpoints(cut)] == [20]


def test_the_state_dict_helpers_step_is_not_a_training_step():
    """torch.distributed.checkpoint creates a stateless optimizer's state (plain SGD, or any fresh optimizer at
    resume) by running optimizer.step() with zero gradients and lr 0; the checkpointer hides it from the step
    hooks, else a Tracker attached before the restore would count (and log) a step that never happened."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    symmetries = nm.find_symmetries(model, torch.randn(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, opt, symmetries, None)
    with step_hooks_suspended(opt):
        get_state_dict(model, opt)
    assert tracker.step == 0 and all(p.grad is None for p in model.parameters())
    get_state_dict(model, opt)  # the same call, hooks attached: the tracker sees a step
    assert tracker.step == 1
    tracker.close()


def test_distributed_strategy_config():
    assert tiny_cfg().distributed.strategy == "ddp"
    for value, needle in (("fsdp", "FSDP1"), ("fsdp1", "FSDP1"), ("zero3", "unknown strategy")):
        with pytest.raises(ConfigError, match=needle) as info:
            tiny_cfg(f"distributed.strategy={value}")
        assert "fsdp2" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="fp16"):
        tiny_cfg("distributed.strategy=fsdp2", "precision=fp16")
    # a checkpoint written before the key existed resumes: a missing key counts as its default
    saved = config_to_dict(tiny_cfg())
    del saved["distributed"]
    assert config_mismatch(saved, config_to_dict(tiny_cfg())) == []
    assert config_mismatch(saved, config_to_dict(tiny_cfg("distributed.strategy=fsdp2"))) == [
        "distributed.strategy"]
