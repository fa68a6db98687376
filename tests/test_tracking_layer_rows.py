"""`metrics.layer_rows` (the per-layer aggregates of a logged step) against the plain groupby loop it replaced.

The reference below is the pandas loop the tracker ran before the vectorised version: every aggregate must come out
bit for bit the same (same numpy function of the same values in the same order), on a frame with the awkward cases:
NaN predictions and gradients, invalid groups, a layer with no valid group, groups without a layer, interleaved
layers (order of first appearance), scale and non-scale kinds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

from neural_mechanics.tracking.metrics import (
    LAYER_AGGREGATES,
    PREDICTION_COLUMNS,
    error_column,
    error_denominator,
    layer_rows,
    relative_error,
)


def reference_layer_rows(df: pd.DataFrame) -> dict[str, list[Any]]:
    """The groupby loop (one pandas selection per layer and column)."""
    den = error_denominator(df["norm"].to_numpy(), df["norm_max"].to_numpy())
    meas = df["measured"].to_numpy()
    df = df.assign(**{error_column(c): relative_error(meas, df[c].to_numpy(), den) for c in PREDICTION_COLUMNS})
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = df["lr"].to_numpy() / df["measured"].to_numpy()
        df = df.assign(eff_lr=np.where(df["kind"].to_numpy() == "scale", eff, np.nan))
    out: dict[str, list[Any]] = {c: [] for c in LAYER_AGGREGATES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (layer, kind), g in df.groupby(["layer", "kind"], sort=False):
            v = g[g["valid"]]
            out["step"].append(int(g["step"].iloc[0]))
            out["layer"].append(layer)
            out["kind"].append(kind)
            out["n_groups"].append(len(g))
            out["n_valid"].append(len(v))
            out["mean_charge"].append(float(g["measured"].mean()))
            for col in PREDICTION_COLUMNS:
                name = error_column(col)
                e = v[name].to_numpy()
                out[f"{name}_max"].append(float(np.nanmax(e)) if len(e) else math.nan)
                out[f"{name}_median"].append(float(np.nanmedian(e)) if len(e) else math.nan)
            out["grad_norm"].append(float(np.sqrt(np.nansum(g["grad_norm"].to_numpy() ** 2)))
                                    if g["grad_norm"].notna().any() else math.nan)
            out["angular_update_median"].append(float(np.nanmedian(g["angular_update"].to_numpy()))
                                                if kind == "scale" else math.nan)
            out["effective_lr_median"].append(float(np.nanmedian(g["eff_lr"].to_numpy())) if kind == "scale"
                                              else math.nan)
            out["lr"].append(float(np.nanmedian(g["lr"].to_numpy())))
            scale = kind == "scale"
            for name, values in (("angular_update_eq_median", g["angular_update_eq"]),
                                 ("equilibrium_ratio_median", g["measured"] / g["predicted_equilibrium"]),
                                 ("update_ratio_median", g["update_ratio"]),
                                 ("relaxation_time", g["relaxation_time"])):
                out[name].append(float(np.nanmedian(values.to_numpy(dtype=np.float64))) if scale else math.nan)
    return out


def _frame(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 600
    layers = np.array(["conv1", "conv2", "fc", "conv1", "bn", None], dtype=object)[rng.integers(0, 6, n)]
    kinds = np.array(["scale", "rescale", "translation"], dtype=object)[rng.integers(0, 3, n)]
    layers[:3] = "late"  # a layer first seen at the top, then never again
    kinds[:3] = "scale"
    layers[3:8], kinds[3:8] = "dead", "scale"  # a layer whose groups are all invalid

    def col(nan_frac: float = 0.1) -> np.ndarray:
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-8, 3, n)
        x[rng.random(n) < nan_frac] = np.nan
        return x

    measured = col(0.0)
    measured[rng.random(n) < 0.02] = 0.0  # eff_lr and equilibrium ratio divide by it
    df = pd.DataFrame({"step": np.full(n, 40, dtype=np.int64), "group": [f"g{i}" for i in range(n)], "kind": kinds,
                       "layer": layers, "measured": measured, **{c: col() for c in PREDICTION_COLUMNS},
                       "norm": np.abs(col(0.0)), "grad_norm": col(0.3), "angular_update": col(),
                       "lr": np.full(n, 0.05), "angular_update_eq": col(), "predicted_equilibrium": col(),
                       "update_ratio": col(), "relaxation_time": col(), "valid": rng.random(n) > 0.2})
    df.loc[3:7, "valid"] = False
    df.loc[df["layer"] == "fc", "grad_norm"] = np.nan  # a layer without any gradient norm
    df["norm_max"] = df["norm"] * (1 + rng.random(n))
    return df


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed0", "seed1", "seed2"])
def test_layer_rows_bitwise_equal_to_the_groupby_loop(seed):
    df = _frame(seed)
    got, want = layer_rows(df), reference_layer_rows(df)
    assert list(got) == list(want) == list(LAYER_AGGREGATES)
    assert got["layer"] == want["layer"] and got["kind"] == want["kind"]
    assert None not in got["layer"] and got["layer"][0] == "late"
    for c in LAYER_AGGREGATES:
        a = np.asarray(got[c], dtype=object if c in ("layer", "kind") else None)
        b = np.asarray(want[c], dtype=object if c in ("layer", "kind") else None)
        if a.dtype.kind == "f":
            assert a.tobytes() == b.tobytes(), c  # bit for bit, NaNs included
        else:
            assert a.tolist() == b.tolist(), c
    dead = got["layer"].index("dead")
    assert got["n_valid"][dead] == 0 and math.isnan(got[f"{error_column(PREDICTION_COLUMNS[0])}_max"][dead])
