"""Reading a run directory back: `open_run(dir)` -> `Run` (`.frame()`, `.layers()`, `.metrics()`, `.manifest`).

`Run.frame()` is the long form of docs/contract.md, joined from the group table, the charges and the steps tables
(`encoding.decode`), de-duplicated on (step, group) keeping the row of the latest part, sorted by step and group
name. A version-1 run's groups/ parts (the long form as stored) are read as they are, and joined with version-2
rows when a version-1 run was resumed by this version. Selections (kind, layer, groups) are applied to the group
ids before anything is decoded.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neural_mechanics.errors import RunStoreError
from neural_mechanics.symmetry.groups import SymmetrySet
from neural_mechanics.tracking.encoding import FRAME_COLUMNS, STEP_COLUMNS, GroupTable, decode, step_major
from neural_mechanics.tracking.layout import (
    GROUP_TABLE,
    KEYS,
    LEGACY_GROUPS,
    SCHEMA_VERSION,
    SCHEMAS,
    parts,
    read_group_table,
)

__all__ = ["Run", "last_per_step", "open_run"]


@dataclass
class Run:
    """A run directory read back: `.manifest`, `.symmetries`, `.frame()`, `.layers()`, `.metrics()`."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def symmetries(self) -> SymmetrySet:
        return SymmetrySet.from_json(json.dumps({"symmetries": self.manifest.get("symmetries") or [],
                                                 "meta": self.manifest.get("symmetry_meta") or {}}))

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def invalid(self) -> dict[str, str]:
        """Groups whose predictions are not valid, with the reason."""
        return dict(self.manifest.get("invalid") or {})

    def _arrow(self, name: str, each: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table | None:
        """Every readable part of one table directory (passed through `each`), concatenated in part order (None: no
        part)."""
        found = parts(self.dir / name)
        tables = []
        for i, (_, path) in enumerate(found):
            try:
                table = pq.read_table(path)
                tables.append(table if each is None else each(table))
            except Exception as e:
                if i == len(found) - 1:
                    warnings.warn(f"skipping corrupt or truncated last part {path} ({e}); "
                                  "the rows of that flush are lost", RuntimeWarning, stacklevel=4)
                    continue
                raise RunStoreError(f"part file {path} is corrupt: {e}",
                                    f"move {path} out of the run directory to read the rest") from e
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def _table(self, name: str) -> pd.DataFrame:
        table = self._arrow(name)
        if table is None:
            return _empty(SCHEMAS[name])
        df = table.to_pandas()
        df = df.drop_duplicates(subset=KEYS[name], keep="last")
        return df.sort_values(KEYS[name], kind="stable").reset_index(drop=True)

    def _charges(self, kind: str | None, layer: str | None, names: Sequence[str] | None) -> pd.DataFrame | None:
        """The version-2 rows in long form (None when there are none)."""
        charges = self._arrow("charges", step_major)  # parts are written group-major (encoding.group_major)
        if charges is None:
            return None
        table = read_group_table(self.dir)
        n = len(table)
        gid = charges.column("gid").to_numpy()
        if len(gid) and (gid.min() < 0 or gid.max() >= n):
            raise RunStoreError(f"{self.dir / 'charges'} names group ids that {GROUP_TABLE} does not have",
                                f"restore {self.dir / GROUP_TABLE}, or move charges/ out to read the rest")
        charges = _latest(charges, n)
        wanted = _selected(table, kind, layer, names)
        if wanted is not None:
            charges = charges.filter(pa.array(wanted[charges.column("gid").to_numpy()]))
        charges = _by_step_and_name(charges, table)
        steps = self._arrow("steps")
        steps = (pa.table({c: pa.array([], t) for c, t in STEP_COLUMNS.items()}) if steps is None
                 else last_per_step(steps))
        return decode(charges, steps, table)

    def frame(self, kind: str | None = None, layer: str | None = None,
              groups: str | Sequence[str] | None = None) -> pd.DataFrame:
        """Long-form per-group time series: step, group, kind, layer, measured, predicted_* (NaN = n/a), ..."""
        names = None if groups is None else ([groups] if isinstance(groups, str) else list(groups))
        current = self._charges(kind, layer, names)
        if not parts(self.dir / LEGACY_GROUPS):
            return current if current is not None else _empty(FRAME_COLUMNS)
        legacy = self._table(LEGACY_GROUPS).reindex(columns=list(FRAME_COLUMNS))  # older runs lack some columns
        if kind is not None:
            legacy = legacy[legacy["kind"] == kind]
        if layer is not None:
            legacy = legacy[legacy["layer"] == layer]
        if names is not None:
            legacy = legacy[legacy["group"].isin(names)]
        if current is None:
            return legacy.reset_index(drop=True)
        df = pd.concat([legacy, current], ignore_index=True).drop_duplicates(["step", "group"], keep="last")
        return df.sort_values(["step", "group"], kind="stable").reset_index(drop=True)

    def layers(self) -> pd.DataFrame:
        """Per (step, layer, kind) aggregates: relative errors, gradient norm, angular update, effective lr."""
        return self._table("layers")

    def metrics(self) -> pd.DataFrame:
        """What the training loop logged through `Tracker.log_metrics`: step, split, name, value."""
        return self._table("metrics")


def _latest(charges: pa.Table, n_groups: int) -> pa.Table:
    """One row per (step, gid), the latest part's, in (step, gid) order (already so when nothing repeats)."""
    key = charges.column("step").to_numpy().astype(np.int64) * max(n_groups, 1) + charges.column("gid").to_numpy()
    if len(key) < 2 or bool(np.all(key[1:] > key[:-1])):
        return charges
    _, first = np.unique(key[::-1], return_index=True)
    return charges.take(pa.array(len(key) - 1 - first))


def _selected(table: GroupTable, kind: str | None, layer: str | None, names: Sequence[str] | None
              ) -> np.ndarray | None:
    """bool [groups]: the groups a frame(kind, layer, groups) selection keeps (None: all)."""
    if kind is None and layer is None and names is None:
        return None
    wanted = np.ones(len(table), dtype=bool)
    if kind is not None:
        wanted &= np.asarray(table.kinds, dtype=object) == kind
    if layer is not None:
        wanted &= np.asarray(table.layers, dtype=object) == layer
    if names is not None:
        wanted &= pd.Index(table.names).isin(list(names))
    return wanted


def _by_step_and_name(charges: pa.Table, table: GroupTable) -> pa.Table:
    """Rows in (step, group name) order, the frame's order (group ids follow the symmetry set's order)."""
    n = len(table)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(np.asarray(table.names, dtype=object), kind="stable")] = np.arange(n)
    if bool(np.all(rank == np.arange(n))):
        return charges
    order = np.lexsort((rank[charges.column("gid").to_numpy()], charges.column("step").to_numpy()))
    return charges.take(pa.array(order))


def last_per_step(steps: pa.Table) -> pa.Table:
    """Steps rows, one per step (the last one given), in step order."""
    step = steps.column("step").to_numpy()
    if len(step) < 2 or bool(np.all(np.diff(step) > 0)):
        return steps
    _, idx = np.unique(step[::-1], return_index=True)
    return steps.take(pa.array(len(step) - 1 - idx))


def _pandas_dtype(t: pa.DataType) -> str:
    if t == pa.int64():
        return "int64"
    if t == pa.bool_():
        return "bool"
    if t == pa.float64():
        return "float64"
    return "object"


def _empty(schema: Mapping[str, pa.DataType]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_pandas_dtype(t)) for c, t in schema.items()})


def open_run(run_dir: str | os.PathLike[str]) -> Run:
    """Read a run directory written by `Tracker` (raises RunStoreError when it is missing or broken)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunStoreError(f"run directory {path} does not exist", "pass the run_dir given to the Tracker")
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise RunStoreError(f"{path} has no manifest.json, so it is not a run directory",
                            "pass the run_dir given to the Tracker (it writes manifest.json first)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise RunStoreError(f"{mpath} is unreadable: {e}", "restore the manifest from a backup") from e
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise RunStoreError(f"{mpath} is not a neural-mechanics manifest", "pass a run directory written by Tracker")
    if int(manifest["schema_version"]) > SCHEMA_VERSION:
        raise RunStoreError(f"{mpath} has schema version {manifest['schema_version']}, newer than this package "
                            f"reads ({SCHEMA_VERSION})", "upgrade neural-mechanics")
    return Run(path, manifest)
