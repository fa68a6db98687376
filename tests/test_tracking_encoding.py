"""How the groups frame is stored (tracking/encoding.py): each column's precision budget, the lr kept per step, group
ids into a table kept once, and that what the tracker aggregates is what reads back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neural_mechanics.tracking.encoding import (
    CHARGE_COLUMNS,
    FRAME_COLUMNS,
    GroupTable,
    decode,
    encode,
    roundtrip,
)
from neural_mechanics.tracking.metrics import EQUILIBRIUM_COLUMNS, PREDICTION_COLUMNS

FLOAT32 = ("grad_norm", "angular_update", *EQUILIBRIUM_COLUMNS)
EPS32 = 2.0 ** -24


def frame_columns(rng: np.random.Generator, n: int, steps: int = 3, lrs: tuple[float, ...] = (0.05,)) -> dict:
    """A long-form groups frame of `steps` logged steps x `n` groups with values of every size and kind of deviation:
    predictions equal to rounding, at 1e-8 .. 1e-1, far off, NaN (not applicable); norms equal to |measured| or not."""
    size = n * steps
    m = rng.standard_normal(size) * 10.0 ** rng.integers(-30, 8, size)
    rel = np.where(rng.random(size) < 0.3, rng.standard_normal(size) * 1e-15,
                   rng.standard_normal(size) * 10.0 ** rng.integers(-8, 1, size))
    cols = {"step": np.repeat(np.arange(steps) * 10, n), "group": np.tile([f"g{i}" for i in range(n)], steps),
            "kind": np.tile(np.array(["scale", "rescale", "translation"])[np.arange(n) % 3], steps),
            "layer": np.tile([f"layer{i // 4}" for i in range(n)], steps), "measured": m}
    for j, col in enumerate(PREDICTION_COLUMNS):
        p = m * (1 + rel * (j + 1))
        p[rng.random(size) < 0.1] = np.nan
        cols[col] = p
    cols["breaking"] = cols["predicted_breaking"] - cols["predicted_exact"]
    cols["breaking_term"] = rng.standard_normal(size) * 1e-3
    cols["lr"] = np.asarray(lrs)[np.arange(size) % len(lrs)]
    cols["norm"] = np.where(cols["kind"] == "scale", np.abs(m), np.abs(m) * 1.7 + 1e-3)
    cols["grad_norm"] = np.abs(rng.standard_normal(size))
    cols["angular_update"] = np.where(cols["kind"] == "scale", np.abs(rng.standard_normal(size)) * 1e-2, np.nan)
    for col in EQUILIBRIUM_COLUMNS:  # values of every size, NaN where not applicable
        magnitude = np.abs(rng.standard_normal(size)) * 10.0 ** rng.integers(-6, 4, size)
        cols[col] = np.where(rng.random(size) < 0.2, np.nan, magnitude)
    cols["valid"] = rng.random(size) < 0.9
    return cols


def stored_and_read(cols: dict) -> tuple[pa.Table, pa.Table, object]:
    table = GroupTable()
    gid, grew = table.ids(cols["group"], cols["kind"], cols["layer"])
    assert grew
    charges, steps = encode(cols, gid)
    return charges, steps, decode(charges, steps, table)


def test_precision_budget_of_every_column():
    """measured, breaking_term, lr exact; predictions to 2^-24 of their deviation from measured (+ an ulp of it);
    norm, grad_norm, angular_update to float32; breaking = predicted_breaking - predicted_exact as read."""
    cols = frame_columns(np.random.default_rng(0), 60)
    _, _, df = stored_and_read(cols)
    assert list(df.columns) == list(FRAME_COLUMNS)
    for c in ("step", "group", "kind", "layer", "measured", "breaking_term", "lr", "valid"):
        assert np.array_equal(df[c].to_numpy(), np.asarray(cols[c]), equal_nan=c in ("measured",)), c
    m = cols["measured"]
    for c in PREDICTION_COLUMNS:
        p, got = cols[c], df[c].to_numpy()
        assert np.array_equal(np.isnan(p), np.isnan(got)), c
        ok = ~np.isnan(p)
        # float32 deviation (+ its smallest subnormal step, 2^-149) + rounding of measured + deviation in float64
        bound = 1.01 * EPS32 * np.abs(p - m) + 2.0 ** -149 + 2.0 ** -52 * np.maximum(np.abs(m), np.abs(p))
        assert (np.abs(got - p)[ok] <= bound[ok]).all(), c
        # the error |p - m| keeps 7 significant digits at every size (within float32's normal range)
        sel = ok & (np.abs(p - m) > 1e-9 * np.abs(m)) & (np.abs(p - m) > 2.0 ** -126)
        np.testing.assert_allclose(np.abs(got - m)[sel], np.abs(p - m)[sel], rtol=2e-7)
    assert np.array_equal(df["breaking"], df["predicted_breaking"] - df["predicted_exact"], equal_nan=True)
    scale = cols["kind"] == "scale"
    assert np.array_equal(df["norm"].to_numpy()[scale], cols["norm"][scale])       # |measured|: exact
    np.testing.assert_allclose(df["norm"].to_numpy(), cols["norm"], rtol=EPS32)
    for c in FLOAT32:
        np.testing.assert_allclose(df[c].to_numpy(), cols[c], rtol=EPS32, equal_nan=True)


def test_what_is_stored_per_row_is_numbers_only():
    """Group identity is an int32 into the group table; lr is kept per step; nothing per row is a string."""
    cols = frame_columns(np.random.default_rng(1), 30, steps=4)
    charges, steps, _ = stored_and_read(cols)
    assert charges.schema.names == list(CHARGE_COLUMNS)
    assert not any(pa.types.is_string(t) for t in charges.schema.types)
    assert charges.schema.field("gid").type == pa.int32()
    assert charges.column("lr").null_count == len(charges)                  # one lr per step: in the steps table
    assert steps.column("step").to_pylist() == [0, 10, 20, 30]
    assert steps.column("lr").to_pylist() == [0.05] * 4
    assert charges.column("norm").null_count == int((cols["kind"] == "scale").sum())


def test_learning_rates_that_differ_between_groups_are_kept_per_row():
    cols = frame_columns(np.random.default_rng(2), 9, steps=2, lrs=(0.1, 0.01, 0.1))
    cols["lr"][9:] = 0.2                                                     # step 10: one lr again
    charges, steps, df = stored_and_read(cols)
    assert np.array_equal(df["lr"].to_numpy(), cols["lr"])
    assert steps.column("lr").to_pylist() == [None, 0.2]
    assert charges.column("lr").null_count == 9


@settings(max_examples=60, deadline=None)
@given(m=st.floats(allow_nan=True, allow_infinity=True, width=64),
       p=st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_roundtrip_is_what_reads_back_and_is_idempotent(m, p):
    """roundtrip (what the tracker aggregates) equals decode(encode(.)), and storing a read-back value again changes
    nothing; where measured is not finite the prediction itself is kept (float32)."""
    cols = {"step": np.array([0]), "group": np.array(["g"]), "kind": np.array(["scale"]), "layer": np.array(["l"]),
            "measured": np.array([m]), **{c: np.array([p]) for c in PREDICTION_COLUMNS},
            "breaking": np.array([0.0]), "breaking_term": np.array([p]), "lr": np.array([0.1]),
            "norm": np.array([abs(p)]), "grad_norm": np.array([1.0]), "angular_update": np.array([np.nan]),
            **{c: np.array([p]) for c in EQUILIBRIUM_COLUMNS}, "valid": np.array([True])}
    with np.errstate(all="ignore"):
        once = roundtrip(cols)
        _, _, df = stored_and_read(cols)
        for c, v in once.items():
            assert np.array_equal(df[c].to_numpy(), v, equal_nan=True), c
        twice = roundtrip({**cols, **once})
    for c, v in once.items():
        assert np.array_equal(twice[c], v, equal_nan=True), c
    if not np.isfinite(m) and not (np.isfinite(p) and abs(p) > 3.4e38):
        assert np.array_equal(once["predicted_exact"], np.float32(p).astype(np.float64)[None], equal_nan=True)


def test_group_table_only_grows_and_keeps_ids():
    table = GroupTable(["a", "b"], ["scale", "rescale"], ["l0", "l1"])
    gid, grew = table.ids(np.array(["b", "a", "b"]), np.array(["rescale", "scale", "rescale"]),
                          np.array(["l1", "l0", "l1"]))
    assert gid.tolist() == [1, 0, 1] and not grew
    gid, grew = table.ids(np.array(["c", "a"]), np.array(["scale", "scale"]), np.array(["l2", "l0"]))
    assert gid.tolist() == [2, 0] and grew
    back = GroupTable.from_arrow(table.to_arrow())
    assert (back.names, back.kinds, back.layers) == (["a", "b", "c"], ["scale", "rescale", "scale"], ["l0", "l1", "l2"])
    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        GroupTable.from_arrow(table.to_arrow().slice(1))
