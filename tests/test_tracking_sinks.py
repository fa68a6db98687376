"""Sinks: where the tracker's rows go. The null sink writes nothing (and the tracker then measures nothing it would
only log), the TensorBoard sink writes the stored per-layer aggregates live, a group of sinks gets identical rows,
and the relative-error definition behind them is the one in tracking/metrics.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from neural_mechanics.theory.applicability import PREDICTION_KINDS
from neural_mechanics.tracking.metrics import PREDICTION_COLUMNS, error_column, relative_errors
from neural_mechanics.tracking.sinks import NullSink, ParquetSink, RunInfo, Sink, SinkGroup, TensorBoardSink
from neural_mechanics.tracking.store import GROUP_COLUMNS, LAYER_COLUMNS, open_run
from neural_mechanics.tracking.tracker import Tracker
from test_tracking_helpers import BNNet, bn_symmetries, make_data, train

torch.set_num_threads(1)


class Recorder(Sink):
    """A sink that keeps every call (what a user's own sink would see)."""

    records = True

    def __init__(self):
        self.calls: list[tuple[str, Any]] = []

    def start(self, info: RunInfo) -> None:
        self.calls.append(("start", info))

    def write_groups(self, columns):
        self.calls.append(("groups", {k: np.asarray(v) for k, v in columns.items()}))

    def write_layers(self, columns):
        self.calls.append(("layers", {k: list(v) for k, v in columns.items()}))

    def write_metrics(self, columns):
        self.calls.append(("metrics", dict(columns)))

    def close(self, status="finished", note=None):
        self.calls.append(("close", status))


def _count_products(tr: Tracker) -> list[tuple[int, str]]:
    """Spy on the tracker's one reduction function: (step, product name) of every per-group sum it forms."""
    names: list[tuple[int, str]] = []
    inner = tr._sums

    def spy(family, products, fields):
        names.extend((tr.step, p.name) for p in products)
        return inner(family, products, fields)

    tr._sums = spy  # type: ignore[method-assign]
    return names


def test_null_sink_writes_nothing_and_skips_log_only_measurements(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    tr = Tracker(net, opt, bn_symmetries(net), log_every=1)
    assert isinstance(tr.sink, NullSink) and tr.writer is None and not tr.sink.records
    seen = _count_products(tr)
    train(net, opt, make_data(), 4)
    tr.log_metrics(3, loss=1.0)
    tr.close()
    assert list(tmp_path.iterdir()) == []
    # step 0 builds the recurrences from the measured charge; later steps measure only what the predictions need:
    # heavy ball, B at the pre hook and <b, D b> at the post hook (quadratic), B alone (linear)
    assert {"C", "overlap", "bb"} <= {n for k, n in seen if k == 0}
    later = [n for k, n in seen if k > 0]
    assert sorted(later) == sorted(["B", "B", "bb"] * 3)
    # with a run_dir the same steps log everything
    net2 = BNNet()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05, momentum=0.9)
    tr2 = Tracker(net2, opt2, bn_symmetries(net2), tmp_path / "run", log_every=1)
    seen2 = _count_products(tr2)
    train(net2, opt2, make_data(), 2)
    tr2.close()
    assert {"C", "norm2", "gnorm2"} <= {n for k, n in seen2 if k == 1}


def test_rank_nonzero_writes_nothing_even_with_extra_sinks(tmp_path):
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    rec = Recorder()
    with Tracker(net, opt, bn_symmetries(net), tmp_path / "r1", rank=1, sink=rec) as tr:
        train(net, opt, make_data(), 3)
    assert isinstance(tr.sink, NullSink) and rec.calls == [] and not (tmp_path / "r1").exists()


def test_sink_group_gets_the_rows_the_run_store_keeps(tmp_path):
    torch.manual_seed(0)
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    rec = Recorder()
    with Tracker(net, opt, bn_symmetries(net), tmp_path / "run", log_every=5, sink=rec) as tr:
        train(net, opt, make_data(), 12, on_step=lambda k, loss: tr.log_metrics(k, loss=loss))
    assert isinstance(tr.sink, SinkGroup) and isinstance(tr.sink.sinks[0], ParquetSink)
    assert tr.sink.run_dir == tmp_path / "run" and tr.writer is tr.sink.sinks[0].writer
    kinds = [c for c, _ in rec.calls]
    assert kinds[0] == "start" and kinds[-1] == "close" and kinds.count("groups") == 3  # steps 0, 5, 10 (12: no)
    info = rec.calls[0][1]
    assert info.settings["strategy"] == "sgd" and info.facts["applicability"]["predicted_paper"]["applies"]
    run = open_run(tmp_path / "run")
    stored = run.frame()
    got = pd.concat([pd.DataFrame(c) for k, c in rec.calls if k == "groups"], ignore_index=True)
    got = got.sort_values(["step", "group"], kind="stable").reset_index(drop=True)  # open_run's order
    assert set(got.columns) == set(GROUP_COLUMNS)
    for col in GROUP_COLUMNS:
        np.testing.assert_array_equal(got[col].to_numpy(), stored[col].to_numpy())
    lay = pd.concat([pd.DataFrame(c) for k, c in rec.calls if k == "layers"], ignore_index=True)
    lay = lay.sort_values(["step", "layer", "kind"], kind="stable").reset_index(drop=True)
    assert list(lay.columns) == list(LAYER_COLUMNS)
    pd.testing.assert_frame_equal(lay, run.layers(), check_dtype=False)
    assert sum(len(c["name"]) for k, c in rec.calls if k == "metrics") == len(run.metrics()) == 12


def test_tensorboard_sink_writes_the_layer_aggregates_live_and_purges_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = make_data()
    tb = tmp_path / "tb"
    tr = Tracker(net, opt, bn_symmetries(net), tmp_path / "run", log_every=2, sink=TensorBoardSink(tb))
    train(net, opt, data, 6, on_step=lambda k, loss: tr.log_metrics(k, loss=loss))
    state = tr.state_dict()                  # checkpoint at step 6 ...
    train(net, opt, data, 3, start=6)        # ... the run goes on to step 9 and dies
    tr.sink.flush()
    tr2 = Tracker(net, opt, bn_symmetries(net), tmp_path / "run", log_every=2, sink=TensorBoardSink(tb))
    tr2.load_state_dict(state)               # resumed at 6 (the parameters moved on: only the steps matter here)
    train(net, opt, data, 4, start=6)
    tr2.close()
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    layers = open_run(tmp_path / "run").layers()
    checked = 0
    for row in layers.to_dict("records"):
        for col in ("mean_charge", "err_breaking_max", "grad_norm", "angular_update_median"):
            if not np.isfinite(row[col]):
                continue
            events = [e for e in acc.Scalars(f"{row['kind']}/{row['layer']}/{col}") if e.step == row["step"]]
            assert len(events) == 1, (col, row["step"])                  # steps >= 6 purged, then re-logged once
            assert events[0].value == pytest.approx(row[col], rel=1e-6, abs=1e-30)  # float32 events
            checked += 1
    assert checked > 40 and sorted(layers["step"].unique()) == [0, 2, 4, 6, 8, 10]
    assert {e.step for e in acc.Scalars("metrics/train/loss")} == set(range(6))


def test_one_definition_of_columns_and_relative_error():
    """Prediction columns come from theory's prediction kinds; the store's schema and the error names follow;
    a frame without `norm` falls back to |measured| with the same floor and running max."""
    assert tuple(f"predicted_{k}" for k in PREDICTION_KINDS) == PREDICTION_COLUMNS
    assert all(c in GROUP_COLUMNS for c in PREDICTION_COLUMNS)
    assert all(f"{error_column(c)}_{s}" in LAYER_COLUMNS for c in PREDICTION_COLUMNS for s in ("max", "median"))
    frame = pd.DataFrame({"step": [0, 1, 2], "group": "g", "measured": [2.0, -1e-9, 0.5],
                          "predicted_exact": [2.0, 1e-9, 0.25]})
    err = relative_errors(frame)["err_exact"].to_numpy()
    np.testing.assert_allclose(err, [0.0, 2e-9 / (1e-6 * 2.0), 0.25 / 0.5], rtol=1e-15)
