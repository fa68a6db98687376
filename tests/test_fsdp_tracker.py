"""The Tracker on FSDP2-sharded models, in one process (a 1-rank gloo group: real DTensors, real all_reduce calls):
rows equal those of the unsharded model, the number of collectives per step, every rank taking part in the same
collectives whether it writes or not, and the refusals (FSDP1, partly sharded models, detection on a sharded model).

The 2-process runs (uneven shards, SIGKILL + resume) are in tests/test_fsdp.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

import neural_mechanics as nm
from neural_mechanics.errors import TrackerError
from neural_mechanics.tracking.collective_sums import CollectiveSums, LocalSums
from neural_mechanics.tracking.products import Fields, reduce_products
from neural_mechanics.tracking.sharding import check_not_sharded, sharding
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker

torch.set_num_threads(1)

PREDICTIONS = ("predicted_exact", "predicted_breaking", "predicted_paper")
OPTIMIZERS = {
    "heavy_ball": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "plain": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _train(model, optimizer_name, symmetries, run_dir, steps=9, rank=0, log_every=3):
    x, y = _data()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    tracker = Tracker(model, opt, symmetries, run_dir, log_every=log_every, rank=rank)
    per_step = []
    for _ in range(steps):
        before = getattr(tracker.reduction, "collectives", 0)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        per_step.append(getattr(tracker.reduction, "collectives", 0) - before)
    tracker.close()
    return tracker, per_step


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_sharded_rows_equal_unsharded_rows(one_rank_group, tmp_path, optimizer_name):
    """One rank holds all rows, so the sums are the same sums; only heavy ball's measurement differs (sharded: the
    pre-hook algebra instead of the post-hook buffer product), to float rounding."""
    base = _model()
    symmetries = nm.find_symmetries(base, _data()[0])
    plain, sharded = copy.deepcopy(base), copy.deepcopy(base)
    fully_shard(sharded)
    t_plain, _ = _train(plain, optimizer_name, symmetries, tmp_path / "plain")
    t_sharded, _ = _train(sharded, optimizer_name, symmetries, tmp_path / "sharded")
    assert isinstance(t_plain.reduction, LocalSums) and isinstance(t_sharded.reduction, CollectiveSums)
    assert open_run(tmp_path / "sharded").manifest["tracker"]["sharded"] is True
    a, b = open_run(tmp_path / "plain").frame(), open_run(tmp_path / "sharded").frame()
    assert len(a) == len(b) > 0 and (a["group"] == b["group"]).all()
    norm = a["norm"].to_numpy()
    for col in ("measured", "norm", "grad_norm", "breaking_term"):  # the same sums in the same order
        assert np.array_equal(a[col].to_numpy(), b[col].to_numpy(), equal_nan=True), col
    # heavy ball: U_k from the pre-hook algebra vs torch's float32 buffer; both are float32 rounding away from
    # exact (the predictions' own error against the measured charge is of the same order)
    tol = 1e-6 if optimizer_name == "heavy_ball" else 1e-12
    for col in (*PREDICTIONS, "angular_update"):
        x, y = a[col].to_numpy(), b[col].to_numpy()
        assert np.array_equal(np.isnan(x), np.isnan(y)), col
        if np.isfinite(x).any():
            assert np.nanmax(np.abs(x - y) / norm) <= tol, col


@pytest.mark.parametrize(("optimizer_name", "expected"), [
    ("heavy_ball", [1] * 9),  # every step one all_reduce, log steps (0, 3, 6) included
    ("plain", [1] * 9),
    ("adamw", [1] * 9),  # the identity every step (issue 14): pre sums deferred into the post hook's batch
], ids=["heavy_ball", "plain", "adamw"])
def test_one_all_reduce_per_step(one_rank_group, optimizer_name, expected):
    symmetries = nm.find_symmetries(_model(), _data()[0])
    for rank in (0, 1):  # rank 1 writes nothing, but takes part in every collective (else the ranks would hang)
        model = _model()
        fully_shard(model)
        _, per_step = _train(model, optimizer_name, symmetries, None, rank=rank)
        assert per_step == expected, (rank, per_step)


def test_a_sum_requested_inside_a_batch_reads_nan_until_the_batch_ends(one_rank_group):
    model = _model()
    symmetries = nm.find_symmetries(model, _data()[0])
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Tracker(model, opt, symmetries, None)
    red, fam = tracker.reduction, tracker.families[0]
    fields = tracker.strategy.fields  # type: ignore[attr-defined]
    with red.batch():
        inside = red(fam, [fam.charge], fields)["C"]
        assert torch.isnan(inside).all()  # a strategy reading too early sees NaN, never a partial sum
    assert torch.isfinite(inside).all()
    with red.defer():
        later = red(fam, [fam.norm_sq], fields)["norm2"]
    assert torch.isnan(later).all()
    now = red(fam, [fam.charge], fields)["C"]  # the next collective fills the deferred sum in too
    assert torch.equal(now, inside)
    whole = Fields({n: p.to_local() for n, p in tracker.params.items()})  # one rank holds all of every parameter
    assert torch.equal(later, reduce_products(fam.table, [fam.norm_sq], whole)["norm2"])
    tracker.close()


def test_refusals(one_rank_group):
    # detection (and nmech train's model specs) need the whole model
    model = _model()
    fully_shard(model)
    assert sharding(model) is not None and sharding(model)[0] == "fsdp2"
    with pytest.raises(TrackerError, match="already sharded with FSDP2") as info:
        check_not_sharded(model)
    assert "distributed.strategy=fsdp2" in (info.value.fix or "")

    # FSDP1: refused by the Tracker itself, with what to use instead
    with pytest.warns(UserWarning):  # world size 1: FSDP1 falls back to NO_SHARD but is still the wrapper
        wrapped = FullyShardedDataParallel(nn.Linear(3, 2), device_id=torch.device("cpu"))
    sym = nm.Symmetry("translation", "t", (nm.Member("weight", 0, (0, 1)),))
    with pytest.raises(TrackerError, match="FSDP1") as info:
        Tracker(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), [sym])
    assert "fully_shard" in (info.value.fix or "")

    # a partly sharded model: the unsharded parameters' entries would be counted once per rank
    model = _model()
    symmetries = nm.find_symmetries(model, _data()[0])
    fully_shard(model[0])
    with pytest.raises(TrackerError, match="is not sharded while"):
        Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), symmetries)
