"""The one definition of a prediction's relative error, the prediction columns and the per-layer aggregates.

Everything that compares a prediction with the measured charge imports from here: the tracker's layers frame,
the plots and the report (`plots/source.py: group_errors`), the training loop's summary (`relative_errors`).

    err_k = |p_k - m_k| / max(|n_k|, RELATIVE_ERROR_FLOOR * max_{j <= k} |n_j|, 1e-30)

with m the measured charge, p a prediction and n the group's `norm` (the tracker's column: |C| for scale,
|theta_A1|^2 + |theta_A2|^2 for rescale, sum |theta| over the group for translation; |m| for frames written
without a `norm` column), the running max taken over the group's logged steps j <= k in step order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from neural_mechanics.theory.applicability import PREDICTION_KINDS

__all__ = ["LAYER_AGGREGATES", "PREDICTION_COLUMNS", "RELATIVE_ERROR_FLOOR", "error_column", "error_denominator",
           "layer_rows", "prediction_column", "relative_error", "relative_errors"]

RELATIVE_ERROR_FLOOR = 1e-6
"""Relative errors divide by max(norm_k, RELATIVE_ERROR_FLOOR * max_{j <= k} norm_j) (j over the group's logged steps).

A group whose charge decays to nothing (a dead ReLU channel under weight decay reaches 1e-25) would otherwise
report float rounding of its earlier, larger values as a "relative" error of 1e5..1e10; with the floor its
prediction is still compared absolutely, against a millionth of its own largest size so far.
"""

_TINY = 1e-30


def prediction_column(kind: str) -> str:
    """The groups-frame column of a prediction kind: "exact" -> "predicted_exact"."""
    return f"predicted_{kind}"


PREDICTION_COLUMNS = tuple(prediction_column(kind) for kind in PREDICTION_KINDS)
"""Columns of the groups frame that hold predicted charges, in the order they are shown: predicted_exact,
predicted_breaking, predicted_paper (one per prediction `theory/applicability.py` decides)."""


def error_column(prediction: str) -> str:
    """The error column of a prediction column: "predicted_exact" -> "err_exact"."""
    return "err_" + prediction.removeprefix("predicted_")


LAYER_AGGREGATES = ("step", "layer", "kind", "n_groups", "n_valid", "mean_charge",
                    *(f"{error_column(c)}_{stat}" for c in PREDICTION_COLUMNS for stat in ("max", "median")),
                    "grad_norm", "angular_update_median", "effective_lr_median", "lr")
"""Columns of the layers frame (one row per logged step, layer and kind), in order."""


def error_denominator(norm: np.ndarray, norm_max: np.ndarray, floor: float = RELATIVE_ERROR_FLOOR) -> np.ndarray:
    """max(|norm|, floor * |norm_max|, 1e-30), elementwise (norm_max = the group's largest |norm| so far)."""
    return np.maximum(np.maximum(np.abs(norm), floor * np.abs(norm_max)), _TINY)


def relative_error(measured: pd.Series | np.ndarray, predicted: pd.Series | np.ndarray,
                   denominator: pd.Series | np.ndarray | float | None = None) -> np.ndarray:
    """|predicted - measured| / max(denominator, 1e-30) (denominator: |measured| when None), elementwise.

    Pass `error_denominator(...)` for the tracker's definition. NaN predictions give NaN errors; 0 / 0 is 0.
    """
    m = np.asarray(measured, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    den = np.abs(m) if denominator is None else np.asarray(denominator, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.abs(p - m) / np.maximum(den, _TINY)


def _running_max(values: pd.Series, frame: pd.DataFrame) -> np.ndarray:
    """Per group (frame["group"]), the running max of `values` over the group's rows in step order."""
    order = frame.sort_values("step", kind="stable").index
    return values.loc[order].groupby(frame.loc[order, "group"]).cummax().reindex(frame.index).to_numpy()


def relative_errors(frame: pd.DataFrame, columns: Sequence[str] = PREDICTION_COLUMNS,
                    floor: float = RELATIVE_ERROR_FLOOR) -> pd.DataFrame:
    """A copy of a groups frame with err_<name> = |p - measured| / error_denominator(norm, running max of norm).

    The running max is taken per group over its rows in step order, as the tracker does while logging, so the
    err_* of this function equal those behind the layers frame. A frame without a `norm` column (or with no
    value in it) uses |measured| as the norm. Prediction columns absent from the frame are skipped.
    """
    df = frame.copy()
    has_norm = "norm" in df.columns and df["norm"].notna().any()
    norm = (df["norm"] if has_norm else df["measured"]).abs().astype(np.float64)
    den = error_denominator(norm.to_numpy(), _running_max(norm, df), floor)
    for col in columns:
        if col in df.columns:
            df[error_column(col)] = relative_error(df["measured"].to_numpy(), df[col].to_numpy(), den)
    return df


def layer_rows(df: pd.DataFrame) -> dict[str, list[Any]]:
    """Per (layer, kind) aggregates of one logged step (host side, O(G)); df carries the running `norm_max`.

    Error statistics are over the valid groups; grad_norm = sqrt of the sum of the groups' |g_A|^2; the angular
    update and effective lr (eta / S) medians are over scale groups only.
    """
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
    return out
