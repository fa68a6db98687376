"""Run store: atomic parts, kill-safety, plain-pandas readability, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from neural_mechanics.errors import RunStoreError
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker
from test_tracking_helpers import BNNet, bn_symmetries, make_data, train

torch.set_num_threads(1)


def _write_run(path, steps=40, flush_every=10):
    torch.manual_seed(0)
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    tr = Tracker(net, opt, bn_symmetries(net), path, log_every=5, flush_every=flush_every)
    train(net, opt, make_data(), steps)
    return tr


def test_killed_run_is_readable_and_plain_pandas_reads_it(tmp_path):
    tr = _write_run(tmp_path / "run")            # never closed: as if killed after the last flush
    run = open_run(tmp_path / "run")
    assert run.status == "running"
    df = run.frame()
    assert sorted(df["step"].unique()) == list(range(0, 40, 5))   # step 40 not logged until close
    raw = pd.read_parquet(tmp_path / "run" / "groups")
    assert len(raw) == len(df)
    pd.testing.assert_frame_equal(raw.sort_values(["step", "group"]).reset_index(drop=True), df,
                                  check_dtype=False, check_categorical=False)
    (tmp_path / "run" / "groups" / ".part-000099.parquet.tmp-1").write_bytes(b"half a file")
    assert len(open_run(tmp_path / "run").frame()) == len(df)      # temp files are ignored
    assert len(pd.read_parquet(tmp_path / "run" / "groups")) == len(df)
    assert list(open_run(tmp_path / "run").frame(kind="scale")["kind"].unique()) == ["scale"]
    assert set(open_run(tmp_path / "run").frame(groups="fc.bias")["group"]) == {"fc.bias"}
    assert set(open_run(tmp_path / "run").frame(layer="conv1")["layer"]) == {"conv1"}
    tr.close()
    assert open_run(tmp_path / "run").status == "finished"
    assert 40 in set(open_run(tmp_path / "run").frame()["step"])


def test_truncated_last_part_is_skipped_with_warning(tmp_path):
    tr = _write_run(tmp_path / "run")
    tr.close()
    parts = sorted((tmp_path / "run" / "groups").glob("part-*.parquet"))
    assert len(parts) >= 3
    full = open_run(tmp_path / "run").frame()
    last_rows = len(pd.read_parquet(parts[-1]))
    data = parts[-1].read_bytes()
    parts[-1].write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="corrupt or truncated"):
        df = open_run(tmp_path / "run").frame()
    assert len(df) == len(full) - last_rows
    parts[0].write_bytes(b"garbage")
    with pytest.raises(RunStoreError, match="corrupt"):
        open_run(tmp_path / "run").frame()


def test_open_run_errors(tmp_path):
    with pytest.raises(RunStoreError, match="does not exist"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunStoreError, match="no manifest"):
        open_run(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(RunStoreError, match="unreadable"):
        open_run(tmp_path / "empty")


def test_empty_tables_have_columns(tmp_path):
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    Tracker(net, opt, bn_symmetries(net), tmp_path / "run").close()
    run = open_run(tmp_path / "run")
    assert {"step", "group", "kind", "layer", "measured", "predicted_exact", "predicted_paper"} <= set(run.frame())
    assert list(run.metrics().columns) == ["step", "split", "name", "value"]
