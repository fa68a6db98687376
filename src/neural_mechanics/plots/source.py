"""What a plotter reads: one normalised view of a run, from a live object or a run directory.

Computing is separate from displaying (Cockpit's rule): the tracker and the run store compute and
persist; the plotters only read. A plotter accepts either

- a run directory (str or Path), opened with `neural_mechanics.tracking.store.open_run`, or
- any live object with `.frame()` (groups frame), `.layers()`, `.metrics()`, `.manifest` and
  `.symmetries` (each optional except `.frame()`; attributes or zero-argument methods both work),

and turns it into a `RunView` of plain pandas frames. Missing frames become empty frames and missing
columns are simply absent: each figure states what it needs and `FigureUnavailable` says why a figure
cannot be drawn, so the report can show that reason instead of crashing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neural_mechanics.errors import NMechError, RunStoreError
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.tracking.metrics import PREDICTION_COLUMNS, RELATIVE_ERROR_FLOOR, relative_error, relative_errors
from neural_mechanics.tracking.store import open_run

__all__ = ["FigureUnavailable", "RunView", "group_errors", "load_run", "relative_error"]


class FigureUnavailable(NMechError):
    """The run does not hold the data a figure needs (the message says which data and how to get it)."""


@dataclass
class RunView:
    """A run as the plotters see it: long-form frames plus the manifest."""

    groups: pd.DataFrame
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    manifest: dict[str, Any] = field(default_factory=dict)
    symmetries: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    symmetry_meta: dict[str, Any] = field(default_factory=dict)
    """How the symmetries were found (`SymmetrySet.meta`: loss, coverage, warnings), when the run recorded it."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Optional frames some runs carry (e.g. "constraints", "param_trace")."""

    # ---- derived facts ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        cfg = self.manifest.get("config") or {}
        for key in ("name", "run_name", "experiment"):
            if isinstance(cfg, Mapping) and cfg.get(key):
                return str(cfg[key])
            if self.manifest.get(key):
                return str(self.manifest[key])
        return self.path.name if self.path is not None else "run"

    @property
    def hyper(self) -> dict[str, Any]:
        """Optimizer hyperparameters (lr, momentum, dampening, weight_decay, nesterov, ...), flat.

        The run store keeps {"optimizer": ..., "param_groups": [{...}, ...]}; the first param group's
        values are lifted to the top level (a group-level key never overrides a top-level one), and
        "param_groups" keeps the count. Keys whose values differ between param groups are listed under
        "differs across param groups".
        """
        h = self.manifest.get("hyper") or self.manifest.get("hyperparameters") or {}
        if not isinstance(h, Mapping):
            return {}
        out = {k: v for k, v in h.items() if k != "param_groups"}
        pgs = [pg for pg in (h.get("param_groups") or []) if isinstance(pg, Mapping)]
        if pgs:
            for k, v in pgs[0].items():
                if k != "n_params":
                    out.setdefault(k, v)
            out["param_groups"] = len(pgs)
            differ = sorted({k for pg in pgs[1:] for k in pg if k != "n_params" and pg.get(k) != pgs[0].get(k)})
            if differ:
                out["differs across param groups"] = ", ".join(differ)
        return out

    @property
    def invalid(self) -> dict[str, str]:
        """Groups whose predictions do not apply, with the reason (manifest "invalid" or "invalid_groups")."""
        raw = self.manifest.get("invalid") or self.manifest.get("invalid_groups") or {}
        if isinstance(raw, Mapping):
            return {str(k): str(v) for k, v in raw.items()}
        return {str(g): "" for g in raw}

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def applicability(self) -> dict[str, dict[str, Any]]:
        """Per prediction column: {"applies": bool, "reason": str}, as the tracker decided it (manifest
        "applicability", from `theory/applicability.py`). Runs written before that entry existed: every
        prediction "not applicable" with the manifest's "not_applicable" sentence when it has one, else {}."""
        raw = self.manifest.get("applicability")
        if isinstance(raw, Mapping):
            return {str(k): dict(v) for k, v in raw.items() if isinstance(v, Mapping)}
        why = self.manifest.get("not_applicable")
        if why:
            return {c: {"applies": False, "reason": str(why)} for c in PREDICTION_COLUMNS}
        return {}

    def hyper_value(self, key: str, default: float = 0.0) -> float:
        """A numeric hyperparameter, `default` when absent or not a number."""
        v = self.hyper.get(key, default)
        try:
            return float(v)
        except (TypeError, ValueError):
            return default

    def layer_order(self) -> list[str]:
        """Layers in network order: the symmetries' order of appearance, then the frames'."""
        order: dict[str, None] = {}
        for s in self.symmetries:
            layer = s.get("layer") or str(s.get("members", [{}])[0].get("param", "")).rpartition(".")[0]
            if layer:
                order.setdefault(layer, None)
        for frame in (self.groups, self.layers):
            if "layer" in frame.columns:
                for layer in pd.unique(frame["layer"].astype(str)):
                    order.setdefault(layer, None)
        return list(order)

    def kinds(self) -> list[str]:
        """Kinds present in the groups frame, in KINDS order."""
        if "kind" not in self.groups.columns:
            return []
        present = set(self.groups["kind"].astype(str))
        return [k for k in KINDS if k in present]

    def require(self, frame: str, columns: tuple[str, ...], figure: str) -> pd.DataFrame:
        """The frame named `frame`, or FigureUnavailable naming the missing columns."""
        df = getattr(self, frame) if frame in ("groups", "layers", "metrics") else self.extras.get(frame)
        if df is None or len(df) == 0:
            raise FigureUnavailable(f"{figure}: the run has no {frame} data",
                                    f"track a run that records the {frame} frame")
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise FigureUnavailable(f"{figure}: the {frame} frame lacks column(s) {', '.join(missing)}")
        return df


def _get(obj: Any, name: str) -> Any:
    """obj.name, called when it is a zero-argument method; None when absent."""
    value = getattr(obj, name, None)
    if callable(value):
        value = value()
    return value


def _as_frame(value: Any) -> pd.DataFrame:
    if value is None:
        return pd.DataFrame()
    if isinstance(value, pd.DataFrame):
        return value.copy()
    return pd.DataFrame(value)


def _as_symmetry_dicts(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        value = json.loads(value)
        if isinstance(value, dict):
            value = value.get("symmetries") or []
    out = []
    for s in value:
        if isinstance(s, Mapping):
            out.append(dict(s))
        elif hasattr(s, "to_dict"):
            out.append(s.to_dict())
    return out


def _clean_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce types, add absent prediction columns as NaN and blank out invalid rows' predictions."""
    if "step" in df.columns:
        df["step"] = df["step"].astype(np.int64)
    for col in ("group", "kind", "layer"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    for col in ("measured", *PREDICTION_COLUMNS):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
        elif col != "measured":
            df[col] = np.nan
    if "valid" in df.columns:
        invalid = ~df["valid"].fillna(False).astype(bool)
        df.loc[invalid, list(PREDICTION_COLUMNS)] = np.nan
    return df


def load_run(run: Any) -> RunView:
    """Normalise a run directory, a live tracker/run object or a RunView into a RunView.

    Raises RunStoreError when a directory cannot be read and a TypeError (a bug in the caller) when
    the object has no `.frame()`.
    """
    if isinstance(run, RunView):
        return run
    path: Path | None = None
    if isinstance(run, (str, Path)):
        path = Path(run)
        if not path.exists():
            raise RunStoreError(f"run directory {str(path)!r} does not exist",
                                "pass the run_dir the Tracker wrote (it holds the manifest and frames)")
        run = open_run(path)
    if not hasattr(run, "frame"):
        raise TypeError(f"expected a run directory or an object with .frame(), got {type(run).__name__}")
    path = path or _path_of(run)
    manifest = _get(run, "manifest") or {}
    manifest = dict(manifest) if isinstance(manifest, Mapping) else {}
    live_symmetries = _get(run, "symmetries")
    symmetries = _as_symmetry_dicts(live_symmetries)
    if not symmetries:
        symmetries = _as_symmetry_dicts(manifest.get("symmetries"))
    symmetry_meta = getattr(live_symmetries, "meta", None) or manifest.get("symmetry_meta") or {}
    extras: dict[str, Any] = {}
    for name in ("constraints", "param_trace"):
        value = _get(run, name)
        if value is not None:
            extras[name] = _as_frame(value)
        elif path is not None and (path / f"{name}.parquet").is_file():
            extras[name] = pd.read_parquet(path / f"{name}.parquet")  # written beside the run by the demo/trainer
    return RunView(
        groups=_clean_groups(_as_frame(run.frame())),
        layers=_as_frame(_get(run, "layers")),
        metrics=_as_frame(_get(run, "metrics")),
        manifest=manifest,
        symmetries=symmetries,
        path=path,
        extras=extras,
        symmetry_meta=dict(symmetry_meta) if isinstance(symmetry_meta, Mapping) else {},
    )


def _path_of(run: Any) -> Path | None:
    for attr in ("run_dir", "path", "root", "directory"):
        value = getattr(run, attr, None)
        if isinstance(value, (str, Path)):
            return Path(value)
    return None


def group_errors(groups: pd.DataFrame, columns: Sequence[str] = PREDICTION_COLUMNS, floor: float | None = None
                 ) -> pd.DataFrame:
    """Per-row relative error of each prediction column present: `err_<name>` columns added.

        err_k = |p_k - m_k| / max(n_k, floor * max_{j <= k} n_j)      (j over the group's logged steps)

    This is `tracking.metrics.relative_errors`, the one definition the tracker's layers frame uses too: n_k is
    the tracker's `norm` column (|C| for scale, |theta_A1|^2 + |theta_A2|^2 for rescale, sum |theta_i| for
    translation), or |m_k| for a frame without one; floor defaults to RELATIVE_ERROR_FLOOR (1e-6). The floor
    keeps a group whose charge decays to nothing (a dead ReLU channel under weight decay reaches 1e-25) from
    reporting float rounding of its earlier, larger values as a huge "relative" error.
    """
    return relative_errors(groups, [c for c in columns if c in groups.columns],
                           RELATIVE_ERROR_FLOOR if floor is None else floor)
