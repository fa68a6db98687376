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
from neural_mechanics.tracking.precision import delta_bits, round_significand

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
    """measured, lr exact; breaking_term to 2^-37; predictions to max(2^-37 norm, 2^-24 of their deviation from
    measured) (+ an ulp of it), their deviation to 2^-9 at worst and to float32 where it exceeds 2^-13 of the norm;
    norm, grad_norm, angular_update and the equilibrium columns to 2^-16 (precision.py); breaking as read."""
    cols = frame_columns(np.random.default_rng(0), 60)
    _, _, df = stored_and_read(cols)
    assert list(df.columns) == list(FRAME_COLUMNS)
    for c in ("step", "group", "kind", "layer", "measured", "lr", "valid"):
        assert np.array_equal(df[c].to_numpy(), np.asarray(cols[c]), equal_nan=c in ("measured",)), c
    assert np.all(np.abs(df["breaking_term"].to_numpy() - cols["breaking_term"])
                  <= 2.0 ** -37 * np.abs(cols["breaking_term"]))
    m, norm = cols["measured"], df["norm"].to_numpy()
    for c in PREDICTION_COLUMNS:
        p, got = cols[c], df[c].to_numpy()
        assert np.array_equal(np.isnan(p), np.isnan(got)), c
        ok = ~np.isnan(p)
        dev = np.abs(p - m)
        # the float32 cast (+ its smallest subnormal step) + the budget's rounding + measured + deviation in float64
        bound = 1.01 * (EPS32 * dev + 2.0 ** -37 * norm) + 2.0 ** -149 + 2.0 ** -52 * np.maximum(np.abs(m), np.abs(p))
        assert (np.abs(got - p)[ok] <= bound[ok]).all(), c
        # the error |p - m| keeps 8 bits at every size, and 7 digits where it exceeds 2^-13 of the norm
        sel = ok & (dev > 1e-9 * np.abs(m)) & (dev > 2.0 ** -126)
        np.testing.assert_allclose(np.abs(got - m)[sel], dev[sel], rtol=1.01 * (2.0 ** -9 + EPS32))
        sel &= dev > 2.0 ** -13 * norm
        assert sel.sum() > 20
        np.testing.assert_allclose(np.abs(got - m)[sel], dev[sel], rtol=2e-7)
    assert np.array_equal(df["breaking"], df["predicted_breaking"] - df["predicted_exact"], equal_nan=True)
    scale = cols["kind"] == "scale"
    assert np.array_equal(df["norm"].to_numpy()[scale], cols["norm"][scale])       # |measured|: exact
    np.testing.assert_allclose(df["norm"].to_numpy(), cols["norm"], rtol=1.01 * 2.0 ** -16)
    for c in FLOAT32:
        np.testing.assert_allclose(df[c].to_numpy(), cols[c], rtol=1.01 * 2.0 ** -16, equal_nan=True)


def _reference_rounding(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Round to nearest (ties away from zero) at `keep` significand bits through frexp/ldexp, in float64."""
    f, e = np.frexp(np.abs(x.astype(np.float64)))  # |x| = f 2^e, 1/2 <= f < 1: keep + 1 bits with the leading one
    return np.sign(x) * np.ldexp(np.floor(np.ldexp(f, keep + 1) + 0.5), e - keep - 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_round_significand_equals_rounding_through_frexp(dtype):
    rng = np.random.default_rng(3)
    nmant = np.finfo(dtype).nmant
    x = (rng.standard_normal(4000) * 10.0 ** rng.integers(-30, 30, 4000)).astype(dtype)
    x[:10] = [1.0, -1.0, 0.75, 1.9999999, 3.0, 0.0, -0.0, 2.0 ** -20, 1.5, -1.25]  # exact points and a carry
    assert np.array_equal(round_significand(x, nmant), x)                          # the type's own bits: as is
    keep = rng.integers(0, nmant, x.size)
    got = round_significand(x, keep)
    assert got.dtype == dtype
    assert np.array_equal(got.astype(np.float64), _reference_rounding(x, keep))
    assert np.all(np.abs(got.astype(np.float64) - x) <= 2.0 ** -(keep + 1.0) * np.abs(x.astype(np.float64)))
    assert np.array_equal(round_significand(got, keep), got)                        # idempotent
    special = np.array([np.nan, np.inf, -np.inf, np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal * 7],
                       dtype=dtype)
    assert np.array_equal(round_significand(special, 1), special, equal_nan=True)  # kept: never rounded to inf


def test_delta_bits_follow_the_norm():
    """2^-25 of the norm -> 11 bits, a deviation as large as the norm -> float32's 23, a tiny one -> 8; an unusable
    norm keeps float32."""
    norm = np.array([1.0, 1.0, 1.0, 8.0, 0.0, np.nan, np.inf])
    delta = np.array([2.0 ** -25, 0.75, 1e-30, 8 * 2.0 ** -25, 1e-3, 1e-3, 1e-3], dtype=np.float32)
    assert delta_bits(delta, norm).tolist() == [11, 23, 8, 11, 23, 23, 23]


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
