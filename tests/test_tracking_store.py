"""Run store: atomic parts, kill-safety, plain-pandas readability, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from neural_mechanics.errors import RunStoreError
from neural_mechanics.tracking.layout import OPTIONS
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker
from test_tracking_helpers import BNNet, bn_symmetries, make_data, train

torch.set_num_threads(1)


def plain_pandas_frame(run_dir):
    """The join of docs/contract.md, with nothing but pandas (and numpy for the diverged-step rule)."""
    ch = pd.read_parquet(run_dir / "charges")
    ch = ch.astype({c: "float64" for c in ch.columns if ch[c].dtype == "float32"})
    ch = ch.merge(pd.read_parquet(run_dir / "groups.parquet"), on="gid")
    ch = ch.merge(pd.read_parquet(run_dir / "steps"), on="step", suffixes=("", "_step"))
    ch["lr"] = ch["lr"].fillna(ch["lr_step"])
    ch["norm"] = ch["norm"].fillna(ch["measured"].abs())
    for kind in ("exact", "breaking", "paper"):
        d = ch[f"delta_{kind}"]
        ch[f"predicted_{kind}"] = np.where(np.isfinite(ch["measured"]), ch["measured"] + d, d)
    ch["breaking"] = ch["predicted_breaking"] - ch["predicted_exact"]
    return ch.sort_values(["step", "group"]).reset_index(drop=True)


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
    raw = plain_pandas_frame(tmp_path / "run")
    assert len(raw) == len(df)
    pd.testing.assert_frame_equal(raw[list(df.columns)], df, check_dtype=False, check_categorical=False)
    (tmp_path / "run" / "charges" / ".part-000099.parquet.tmp-1").write_bytes(b"half a file")
    assert len(open_run(tmp_path / "run").frame()) == len(df)      # temp files are ignored
    assert len(pd.read_parquet(tmp_path / "run" / "charges")) == len(df)
    assert list(open_run(tmp_path / "run").frame(kind="scale")["kind"].unique()) == ["scale"]
    assert set(open_run(tmp_path / "run").frame(groups="fc.bias")["group"]) == {"fc.bias"}
    assert set(open_run(tmp_path / "run").frame(layer="conv1")["layer"]) == {"conv1"}
    tr.close()
    assert open_run(tmp_path / "run").status == "finished"
    assert 40 in set(open_run(tmp_path / "run").frame()["step"])


def test_parts_are_group_major_and_step_major_parts_of_earlier_runs_read_the_same(tmp_path):
    """Charges parts are written in (gid, step) order; a schema-2 run written before that (parts in (step, gid) order,
    rewritten here so) reads back to the same frame."""
    _write_run(tmp_path / "run").close()
    frame = open_run(tmp_path / "run").frame()
    parts = sorted((tmp_path / "run" / "charges").glob("part-*.parquet"))
    assert len(parts) >= 3
    steps_per_part = []
    for path in parts:
        table = pq.read_table(path)
        key = table.column("gid").to_numpy().astype(np.int64) * 10**6 + table.column("step").to_numpy()
        assert (np.diff(key) > 0).all()
        steps_per_part.append(len(np.unique(table.column("step").to_numpy())))
        step_major = table.sort_by([("step", "ascending"), ("gid", "ascending")])
        pq.write_table(step_major, path, **OPTIONS["charges"])
    assert max(steps_per_part) > 1                                     # some part holds several steps
    pd.testing.assert_frame_equal(open_run(tmp_path / "run").frame(), frame)


def test_truncated_last_part_is_skipped_with_warning(tmp_path):
    tr = _write_run(tmp_path / "run")
    tr.close()
    parts = sorted((tmp_path / "run" / "charges").glob("part-*.parquet"))
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


# ---- schema version 1 (the long form per row in groups/) -----------------------------------------------------------
V1_COLUMNS = ["step", "group", "kind", "layer", "measured", "predicted_exact", "predicted_breaking", "predicted_paper",
              "breaking", "breaking_term", "lr", "norm", "grad_norm", "angular_update", "valid"]


def write_v1_run(run_dir, frame: pd.DataFrame, symmetries) -> None:
    """A run directory as schema version 1 wrote it, with pyarrow directly (no code of this package)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for t in ("groups", "layers", "metrics"):
        (run_dir / t).mkdir(parents=True)
    manifest = {"schema_version": 1, "status": "finished", "created": "2026-01-01T00:00:00+0000", "invalid": {},
                "notes": [], "config": {}, "hyperparameters": {}, "tracker": {},
                "symmetries": json.loads(symmetries.to_json())}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    types = {"step": pa.int64(), "group": pa.string(), "kind": pa.string(), "layer": pa.string(), "valid": pa.bool_()}
    for i, (_, part) in enumerate(frame.groupby(frame["step"] // 20)):   # one part per 20 steps, as flushes made
        arrays = [pa.array(part[c].to_numpy(), type=types.get(c, pa.float64())) for c in V1_COLUMNS]
        pq.write_table(pa.Table.from_arrays(arrays, names=V1_COLUMNS), run_dir / "groups" / f"part-{i:06d}.parquet")


def test_runs_of_schema_version_1_still_open_and_resume_into_version_2(tmp_path):
    tr = _write_run(tmp_path / "new", steps=40)
    tr.close()
    written = open_run(tmp_path / "new").frame()
    write_v1_run(tmp_path / "old", written, tr.symmetries)
    old = open_run(tmp_path / "old")
    pd.testing.assert_frame_equal(old.frame(), written, check_dtype=False)
    pd.testing.assert_frame_equal(old.frame(kind="scale"), written[written.kind == "scale"].reset_index(drop=True),
                                  check_dtype=False)
    assert old.layers().empty and list(old.metrics().columns) == ["step", "split", "name", "value"]
    # a version-1 run resumed at step 25 by this version: v1 rows before 25, v2 rows from 25 on, one frame
    from neural_mechanics.tracking.store import RunWriter

    w = RunWriter(tmp_path / "old", symmetries=tr.symmetries)
    assert w.truncate_from(25) == int((written.step >= 25).sum())
    later = written[written.step >= 25].copy()
    later["measured"] += 1.0                                      # distinguishable from the dropped v1 rows
    w.append("groups", {c: later[c].to_numpy() for c in later.columns})
    w.flush()
    both = open_run(tmp_path / "old").frame()
    assert len(both) == len(written) and list(both["step"]) == list(written["step"])
    assert list(both["group"]) == list(written["group"])
    np.testing.assert_array_equal(both["measured"], written["measured"] + (written["step"] >= 25))
    assert list((tmp_path / "old" / "groups").glob("part-*")) and list((tmp_path / "old" / "charges").glob("part-*"))


def test_group_ids_stay_when_a_run_is_reopened_with_more_groups(tmp_path):
    net = BNNet()
    syms = bn_symmetries(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    first = syms.filter(kind="scale")
    with Tracker(net, opt, first, tmp_path / "run", log_every=2):
        train(net, opt, make_data(), 4)
    before = open_run(tmp_path / "run").frame()
    ids = pd.read_parquet(tmp_path / "run" / "groups.parquet")
    with Tracker(net, opt, syms, tmp_path / "run", log_every=2) as tr2:
        tr2.load_state_dict({**tr2.state_dict(), "step": 5})        # resume past the rows already written
        train(net, opt, make_data(), 3, start=5)
    after = pd.read_parquet(tmp_path / "run" / "groups.parquet")
    assert after.iloc[: len(ids)].equals(ids) and len(after) == len(syms)
    df = open_run(tmp_path / "run").frame()
    pd.testing.assert_frame_equal(df[df.step < 5].reset_index(drop=True), before[before.step < 5], check_dtype=False)
    assert set(df[df.step >= 5]["group"]) == {s.name for s in syms}


def test_learning_rates_per_param_group_come_back_per_group(tmp_path):
    net = BNNet()
    syms = bn_symmetries(net)
    fc = [p for n, p in net.named_parameters() if n.startswith("fc.")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.SGD([{"params": rest, "lr": 0.05}, {"params": fc, "lr": 0.01}], momentum=0.9)
    with Tracker(net, opt, syms, tmp_path / "run", log_every=2):
        train(net, opt, make_data(), 4)
    df = open_run(tmp_path / "run").frame()
    fc_groups = df["group"].isin([s.name for s in syms if all(m.param.startswith("fc.") for m in s.members)])
    assert fc_groups.any() and (df.loc[fc_groups, "lr"] == 0.01).all() and (df.loc[~fc_groups, "lr"] == 0.05).all()
