"""Distributed training: `nmech train` under torchrun (2 CPU processes, gloo, loopback) equals one process with the
same global batch; a model spec that returns an already sharded model, and FSDP1, are refused with a TrackerError
(FSDP2 itself runs: tests/test_fsdp.py).

The model has no BatchNorm on purpose: under DDP BatchNorm normalises with per-rank batch statistics, so a BN
model on 2 ranks is not the same computation as one process with the global batch (see train.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from neural_mechanics.errors import TrackerError
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.sharding import check_not_sharded
from neural_mechanics.tracking.store import open_run
from test_train import tiny_cfg, tiny_overrides

torch.set_num_threads(1)

DDP = ("steps=20", "batch_size=32", "tracker.log_every=1", "checkpoint_every=10", "eval_every=10")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    single = run_training(tiny_cfg(*DDP), run_dir=tmp_path / "single", progress=False)
    assert single.world_size == 1

    sets = [a for o in tiny_overrides(*DDP) for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "neural_mechanics.cli", "train", "demo", *sets,
           "--run-dir", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]

    run = open_run(tmp_path / "ddp")
    assert run.status == "finished"
    dist = run.manifest["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert dist["rank_disagreement"] == 0.0  # every rank advanced bit-identical predictions
    a, b = open_run(tmp_path / "single").frame(), run.frame()
    assert len(a) == len(b) > 0 and (a["group"] == b["group"]).all() and (a["step"] == b["step"]).all()
    norm = a["norm"].to_numpy()
    worst = {}
    for col in ("measured", "predicted_exact", "predicted_breaking", "predicted_paper"):
        worst[col] = float(np.nanmax(np.abs(a[col].to_numpy() - b[col].to_numpy()) / norm))
        assert worst[col] <= 1e-6, worst
    print("DDP vs single process, max relative difference:", worst)
    ma, mb = open_run(tmp_path / "single").metrics(), run.metrics()
    assert (ma[["step", "split", "name"]].to_numpy() == mb[["step", "split", "name"]].to_numpy()).all()
    assert np.allclose(ma["value"], mb["value"], rtol=1e-5, atol=1e-7)  # the logged loss is the global-batch loss
    assert not (tmp_path / "ddp" / "checkpoint.pt.tmp").exists()


def _torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(os.path.dirname(__file__), "ddp_worker.py"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_torchrun_resume_continues_every_ranks_random_stream(tmp_path):
    """Dropout on 2 ranks: a run stopped at a checkpoint and resumed equals the uninterrupted one bit for bit.

    Ranks > 0 draw from their own stream (independent dropout masks per rank), so the checkpoint must hold every
    rank's RNG state; restoring rank 0's on every rank would change rank 1's masks after the resume.
    """
    _torchrun(str(tmp_path / "full"), "full")
    _torchrun(str(tmp_path / "cut"), "stop")
    assert open_run(tmp_path / "cut").status == "running"
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # two different streams
    _torchrun(str(tmp_path / "cut"), "resume")
    a, b = open_run(tmp_path / "full"), open_run(tmp_path / "cut")
    assert a.status == b.status == "finished"
    fa, fb = a.frame(), b.frame()
    assert len(fa) == len(fb) > 0 and fa["step"].max() == 20
    for col in ("measured", "predicted_exact", "predicted_breaking", "predicted_paper"):
        assert np.array_equal(fa[col].to_numpy(), fb[col].to_numpy(), equal_nan=True), col
    ma, mb = a.metrics(), b.metrics()
    assert np.array_equal(ma["value"].to_numpy(), mb["value"].to_numpy())


@pytest.fixture
def single_rank_group():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_already_sharded_models_and_fsdp1_are_refused(single_rank_group, tmp_path, monkeypatch):
    """nmech train detects the symmetries on the whole model and shards it itself (distributed.strategy=fsdp2):
    a model spec returning a sharded model is refused before anything is written."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from neural_mechanics.experiments import train as train_mod
    from neural_mechanics.experiments.models import mlp

    def fsdp2_model(spec, num_classes=None, **_):
        m = mlp(num_classes=num_classes or 10, hidden=(8,))
        fully_shard(m)
        return SimpleNamespace(model=m)

    monkeypatch.setattr(train_mod, "resolve_model", fsdp2_model)
    with pytest.raises(TrackerError, match="sharded with FSDP") as info:
        run_training(tiny_cfg("steps=2"), run_dir=tmp_path / "r", progress=False)
    assert "distributed.strategy=fsdp2" in (info.value.fix or "")
    assert not (tmp_path / "r" / "manifest.json").exists()

    with pytest.warns(UserWarning):  # world size 1: FSDP1 falls back to NO_SHARD but is still the wrapper
        wrapped = FullyShardedDataParallel(torch.nn.Linear(3, 2), device_id=torch.device("cpu"))
    with pytest.raises(TrackerError, match=r"FSDP1.*FullyShardedDataParallel") as info:
        check_not_sharded(wrapped)
    assert "fully_shard" in (info.value.fix or "")
    check_not_sharded(torch.nn.Linear(3, 2))  # plain modules pass
