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

__all__ = [
    "EQUILIBRIUM_COLUMNS",
    "LAYER_AGGREGATES",
    "PREDICTION_COLUMNS",
    "REGIME_MIN_UPDATE_RATIO",
    "RELATIVE_ERROR_FLOOR",
    "angular_update_ratio",
    "equilibrium_regime",
    "error_column",
    "error_denominator",
    "layer_rows",
    "prediction_column",
    "relative_error",
    "relative_errors",
]

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


EQUILIBRIUM_COLUMNS = ("predicted_equilibrium", "angular_update_eq", "relaxation_time", "update_ratio")
"""Columns of the groups frame on the weight-decay equilibrium of scale groups (`tracking/rows.py` says what each
holds; NaN where the theory has no prediction, with the reason in the manifest's "equilibrium")."""

LAYER_AGGREGATES = ("step", "layer", "kind", "n_groups", "n_valid", "mean_charge",
                    *(f"{error_column(c)}_{stat}" for c in PREDICTION_COLUMNS for stat in ("max", "median")),
                    "grad_norm", "angular_update_median", "effective_lr_median", "lr",
                    "angular_update_eq_median", "equilibrium_ratio_median", "update_ratio_median", "relaxation_time")
"""Columns of the layers frame (one row per logged step, layer and kind), in order. The last four are over the
layer's scale groups: medians of angular_update_eq, of measured / predicted_equilibrium and of update_ratio, and
the median relaxation_time."""


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
    update and effective lr (eta / S) medians are over scale groups only. Layers come in order of first
    appearance (rows without a layer or kind are left out, as `DataFrame.groupby` does).

    Every column is read into numpy once and each (layer, kind) is an index array into it (one stable sort of the
    group codes), so a log step costs a few numpy calls per layer rather than dozens of pandas selections
    (~90 ms per log step for VGG-16-BN's 11.5k groups before; every aggregate is the same numpy function of the
    same values in the same order, so the numbers are bit for bit those of a groupby loop).
    """
    den = error_denominator(df["norm"].to_numpy(), df["norm_max"].to_numpy())
    meas = df["measured"].to_numpy()
    col = {c: df[c].to_numpy() for c in ("step", "valid", "grad_norm", "angular_update", "lr", "angular_update_eq",
                                         "predicted_equilibrium", "update_ratio", "relaxation_time")}
    errs = {error_column(c): relative_error(meas, df[c].to_numpy(), den) for c in PREDICTION_COLUMNS}
    kinds = df["kind"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        eff_lr = np.where(kinds == "scale", col["lr"] / meas, np.nan)
        eq_ratio = meas / col["predicted_equilibrium"]
    codes = df.groupby(["layer", "kind"], sort=False).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    order = order[codes[order] >= 0]  # -1: no layer or kind (dropped by groupby)
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    layers = df["layer"].to_numpy()
    out: dict[str, list[Any]] = {c: [] for c in LAYER_AGGREGATES}

    def median(values: np.ndarray) -> float:
        return float(np.nanmedian(values.astype(np.float64, copy=False)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for idx in np.split(order, bounds) if len(order) else []:
            first = idx[0]
            kind = kinds[first]
            scale = kind == "scale"
            valid = idx[col["valid"][idx].astype(bool)]
            out["step"].append(int(col["step"][first]))
            out["layer"].append(layers[first])
            out["kind"].append(kind)
            out["n_groups"].append(len(idx))
            out["n_valid"].append(len(valid))
            out["mean_charge"].append(float(pd.Series(meas[idx]).mean()))  # pandas' skipna mean, as Series.mean
            for name, e_all in errs.items():
                e = e_all[valid]
                out[f"{name}_max"].append(float(np.nanmax(e)) if len(e) else math.nan)
                out[f"{name}_median"].append(float(np.nanmedian(e)) if len(e) else math.nan)
            g = col["grad_norm"][idx]
            out["grad_norm"].append(float(np.sqrt(np.nansum(g ** 2))) if not np.isnan(g).all() else math.nan)
            out["angular_update_median"].append(median(col["angular_update"][idx]) if scale else math.nan)
            out["effective_lr_median"].append(median(eff_lr[idx]) if scale else math.nan)
            out["lr"].append(median(col["lr"][idx]))
            for name, values in (("angular_update_eq_median", col["angular_update_eq"]),
                                 ("equilibrium_ratio_median", eq_ratio),
                                 ("update_ratio_median", col["update_ratio"]),
                                 ("relaxation_time", col["relaxation_time"])):
                out[name].append(median(values[idx]) if scale else math.nan)
    return out


def angular_update_ratio(frame: pd.DataFrame, last: float = 0.3) -> pd.DataFrame:
    """Per scale group, measured against predicted equilibrium angle over the last `last` fraction of logged steps.

    ratio = sqrt(mean angular_update^2) / sqrt(mean angular_update_eq^2) over the group's rows with step >= the
    cut (first logged step + (1 - last) * span); the prediction is for the mean-square angle (`theory/rotational.py`).
    Returns group, layer, measured, predicted, ratio (groups without a prediction are left out); the run's figure
    of merit is the median of `ratio` over groups.
    """
    df = frame[(frame["kind"] == "scale") & frame["angular_update_eq"].notna() & frame["angular_update"].notna()]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in (("group", object), ("layer", object),
                            ("measured", float), ("predicted", float), ("ratio", float))})
    lo, hi = int(frame["step"].min()), int(frame["step"].max())
    df = df[df["step"] >= lo + (1 - last) * (hi - lo)]
    rms = df.assign(m2=df["angular_update"] ** 2, p2=df["angular_update_eq"] ** 2).groupby(
        ["group", "layer"], sort=False)[["m2", "p2"]].mean()
    out = pd.DataFrame({"measured": np.sqrt(rms["m2"]), "predicted": np.sqrt(rms["p2"])}).reset_index()
    out["ratio"] = out["measured"] / out["predicted"]
    return out


REGIME_MIN_UPDATE_RATIO = 0.1
"""A layer whose scale groups have median `update_ratio` (|u|^2_A over its noise-dominated value) below this over
the last 30 % of steps is outside the regime of the rotational-equilibrium theory (docs/theory.md section 6.3):
its updates have shrunk toward the optimizer's eps (a fitted layer) and the closed-form predictions do not hold.
Measured on digits-vgg-bn with AdamW (lr 1e-2, wd 0.1, 3000 steps): 30 % randomised labels give a median
update_ratio of 0.72 and angle ratio 0.97; clean labels 0.002 and 0.45 (benchmarks/equilibrium_laws.py). The
threshold sits between them, a decade below the noisy run."""


def equilibrium_regime(frame: pd.DataFrame, last: float = 0.3) -> pd.DataFrame:
    """Per layer, whether its scale groups are in the regime of the equilibrium theory, over the last `last` steps.

    Columns: layer, n_groups (scale groups with an equilibrium prediction), update_ratio (median over the groups of
    each group's median update_ratio over the window), angle_ratio (median over the groups of
    `angular_update_ratio`), in_regime (update_ratio >= REGIME_MIN_UPDATE_RATIO; None where the optimizer has no
    update_ratio, e.g. SGD, whose equilibrium needs no such regime). Layers without predictions are left out.
    """
    cols = ("layer", "n_groups", "update_ratio", "angle_ratio", "in_regime")
    need = {"kind", "step", "layer", "group", "angular_update_eq", "update_ratio"}
    if not need <= set(frame.columns):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    df = frame[(frame["kind"] == "scale") & frame["angular_update_eq"].notna()]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    lo, hi = int(frame["step"].min()), int(frame["step"].max())
    df = df[df["step"] >= lo + (1 - last) * (hi - lo)]
    per_group = df.groupby(["layer", "group"], sort=False)["update_ratio"].median()
    upd = per_group.groupby(level="layer", sort=False).median()
    n = per_group.groupby(level="layer", sort=False).size()
    ang = angular_update_ratio(frame, last).groupby("layer", sort=False)["ratio"].median()
    out = pd.DataFrame({"layer": upd.index, "n_groups": n.to_numpy(), "update_ratio": upd.to_numpy()})
    out["angle_ratio"] = out["layer"].map(ang).astype(float)
    out["in_regime"] = pd.Series([None if not np.isfinite(u) else bool(u >= REGIME_MIN_UPDATE_RATIO)
                                  for u in out["update_ratio"]], dtype=object)  # Python True / False / None
    return out
