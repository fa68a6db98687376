"""The CPU-testable parts of benchmarks/gpu_check.py: the script refuses without CUDA, the model builders, the
host-sync detector (it finds injected syncs, and none in the tracker's hooks between log steps for SGD and AdamW
under bf16 autocast), the timing harness with a CPU clock, the prediction errors and the report's format."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

from neural_mechanics.tracking.tracker import Tracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check as gc

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama() -> gc.Workload:
    return gc.detect(gc.llama_workload(batch=2, seq=16, dim=32, layers=2, heads=4, vocab=64))


@pytest.fixture(scope="module")
def small() -> gc.Workload:
    return gc.detect(gc.small_bn_workload(batch=16))


def test_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_model_builders():
    v = gc.vgg16_bn_workload(batch=2, size=32, classes=10)
    assert v.model(v.x).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in v.model.modules()) == 13  # VGG-16: 13 convs, each BN
    assert isinstance(v.make_optimizer(v.model), torch.optim.SGD)
    paper = gc.vgg16_bn_workload()  # the sizes the script times: batch 256 of 64x64, 200 classes
    assert paper.x.shape == (256, 3, 64, 64) and paper.y.max() < 200
    lw = gc.llama_workload(batch=2, seq=8, dim=32, layers=2, heads=4, vocab=64)
    assert lw.model(lw.x).shape == (2, 8, 64) and lw.autocast is torch.bfloat16
    assert isinstance(lw.make_optimizer(lw.model), torch.optim.AdamW)


def test_sync_detector_flags_host_reads():
    t = torch.ones(3)
    det = gc.SyncDetector()
    with det:
        (t * 2).sum().item()
        bool(t.any())  # and a Python `if` on a tensor
        float(t.sum())
        torch.tensor([1.0, 2.0])  # a tensor from Python data: a host-to-device copy on a GPU
        torch.nonzero(t)  # a data-dependent size
    ops = [op for _, op in det.found]
    assert ops == ["aten._local_scalar_dense.default"] * 3 + ["aten.lift_fresh.default", "aten.nonzero.default"]
    with det:
        torch.full((3,), 2.0).mul_(t).add_(1.0)  # device-side only
        t.tolist()  # on a CPU tensor no op is dispatched: on a GPU it is a copy to the host, flagged there
    assert len(det.found) == 5


def test_tracker_hooks_do_not_sync_between_log_steps(llama, small):
    log_found: list[tuple[int, str]] = []
    assert gc.check_host_syncs(small, steps=7, log_every=5, log_found=log_found) == []  # SGD, momentum, wd
    assert gc.check_host_syncs(llama, steps=7, log_every=5, log_found=log_found) == []  # AdamW, bf16 autocast
    # on log steps (0 and 5; allowed to sync) only tensors built from per-step numbers (the equilibrium columns'
    # constants, lift_fresh: a host-to-device copy on a GPU); no scalar read, and the rows' transfer to the host is
    # no copy at all on the CPU
    assert {step for step, _ in log_found} <= {0, 5}
    assert {op for _, op in log_found} <= {"aten.lift_fresh.default"}


def test_an_injected_sync_is_found_outside_log_steps_only(small, monkeypatch):
    post = Tracker._post

    def syncing_post(self: Tracker) -> None:
        next(iter(self.params.values())).sum().item()
        post(self)

    monkeypatch.setattr(Tracker, "_post", syncing_post)
    log_found: list[tuple[int, str]] = []
    found = gc.check_host_syncs(small, steps=7, log_every=5, log_found=log_found)
    assert found == [(k, "aten._local_scalar_dense.default") for k in (1, 2, 3, 4, 6)]  # steps 0 and 5 log
    reads = [(k, op) for k, op in log_found if op != "aten.lift_fresh.default"]
    assert reads == [(k, "aten._local_scalar_dense.default") for k in (0, 5)]  # recorded, allowed


def test_timing_harness_with_a_cpu_clock():
    naps = {"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.006)}
    calls = {"n": 0}

    def counted() -> None:
        calls["n"] += 1

    assert len(gc.time_steps(counted, 4, gc.CpuClock())) == 4 and calls["n"] == 4
    med = gc.compare_steps(naps, gc.CpuClock(), warmup=1, iters=3, rounds=2)
    assert 0.002 <= med["short"] < med["long"] and med["long"] >= 0.006
    assert med["long"] / med["short"] > 1.5


def test_tracked_vs_untracked_on_cpu(llama):
    r = gc.tracked_vs_untracked(llama, gc.CpuClock(), warmup=1, iters=2, rounds=1)
    assert r["untracked"] > 0 and r["tracked"] > 0 and math.isclose(r["ratio"], r["tracked"] / r["untracked"])
    assert r["groups"] == len(llama.symmetries)


def test_prediction_errors_on_cpu(small):
    err = gc.prediction_errors(small, steps=10, log_every=5)
    assert set(err) == set(gc.PREDICTIONS)
    assert err["predicted_exact"] < 1e-4 and err["predicted_breaking"] < 1e-4  # float32 rounding only
    assert err["predicted_paper"] > err["predicted_exact"]  # the paper's continuous-time formula is approximate


def test_report_format():
    """A snapshot of the layout (not of any measured number)."""
    table = gc.format_table(["model", "ratio"], [["vgg", 1.0234567], ["llama", float("nan")]])
    assert table.splitlines() == ["model  ratio", "-----  -----", "vgg    1.023", "llama      -"]
    timing = gc.timing_section({"m": {"groups": 3.0, "untracked": 0.01, "tracked": 0.0105, "ratio": 1.05}})
    assert timing.splitlines()[-1].split() == ["m", "3", "10", "10.5", "1.05"]
    syncs = gc.sync_section({"a": [], "b": [(3, "aten.nonzero.default")]},
                            {"a": [(0, "x"), (5, "x"), (5, "y")], "b": []}).splitlines()
    assert syncs[-2].split() == ["a", "ok", "2"] and syncs[-1].split()[1:] == ["1", "sync(s):", "step", "3:",
                                                                               "aten.nonzero.default", "0"]
    errors = gc.errors_section({c: 1e-7 for c in gc.PREDICTIONS}, {}, "x").splitlines()
    assert errors[3].split() == ["predicted_exact", "1e-07", "-"]
