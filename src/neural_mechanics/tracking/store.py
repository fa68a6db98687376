"""The run directory: a JSON manifest plus append-only Parquet part files, safe to kill at any moment.

Layout of a run directory::

    manifest.json                     schema version, status, config, hyperparameters, versions,
                                      symmetry table, invalid groups (with reasons), notes
    groups/part-000000.parquet ...    one row per (logged step, group)
    layers/part-000000.parquet ...    one row per (logged step, layer, kind): aggregates
    metrics/part-000000.parquet ...   (step, split, name, value) appended by the training loop

Why this shape: a training run can die at any time (pre-emption, OOM, Ctrl-C). Every flush writes a *new*
part (temp file in the same directory -> fsync -> os.replace), and the manifest is replaced the same way,
so a reader sees either the old or the new state, never half a file. Temp files start with "." so
pandas / pyarrow / polars / duckdb skip them when reading a table directory, and none of those needs this
package to read the data (`pandas.read_parquet("run/groups")`).

Resuming: a run resumed from a checkpoint at step K would re-log steps >= K. The writer *truncates on resume*:
`truncate_from(K)` rewrites (atomically) every part holding rows with step >= K without them, so the directory
never holds duplicates, even for readers that do not use this package. `open_run` additionally de-duplicates
on (step, group) / (step, layer, kind) / (step, split, name) keeping the row of the latest part, in case a
run was killed between a resume and its truncation.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neural_mechanics.errors import RunStoreError
from neural_mechanics.symmetry.groups import SymmetrySet
from neural_mechanics.tracking.metrics import EQUILIBRIUM_COLUMNS, LAYER_AGGREGATES, PREDICTION_COLUMNS

SCHEMA_VERSION = 1
TABLES = ("groups", "layers", "metrics")
_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_KEYS = {"groups": ["step", "group"], "layers": ["step", "layer", "kind"], "metrics": ["step", "split", "name"]}

GROUP_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "group": pa.string(), "kind": pa.string(), "layer": pa.string(),
    "measured": pa.float64(), **dict.fromkeys(PREDICTION_COLUMNS, pa.float64()), "breaking": pa.float64(),
    "breaking_term": pa.float64(), "lr": pa.float64(), "norm": pa.float64(), "grad_norm": pa.float64(),
    "angular_update": pa.float64(), **dict.fromkeys(EQUILIBRIUM_COLUMNS, pa.float64()), "valid": pa.bool_(),
}
_LAYER_TYPES = {"step": pa.int64(), "layer": pa.string(), "kind": pa.string(), "n_groups": pa.int64(),
                "n_valid": pa.int64()}
LAYER_COLUMNS: dict[str, pa.DataType] = {c: _LAYER_TYPES.get(c, pa.float64()) for c in LAYER_AGGREGATES}
METRIC_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "split": pa.string(), "name": pa.string(), "value": pa.float64(),
}
SCHEMAS = {"groups": GROUP_COLUMNS, "layers": LAYER_COLUMNS, "metrics": METRIC_COLUMNS}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same dir, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet table to `path` atomically: temp file in the same dir, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _parts(table_dir: Path) -> list[tuple[int, Path]]:
    if not table_dir.is_dir():
        return []
    out = []
    for p in table_dir.iterdir():
        m = _PART.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def package_versions() -> dict[str, str]:
    try:
        nm_version = version("neural-mechanics")
    except PackageNotFoundError:
        nm_version = "unknown"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "neural_mechanics": nm_version,
            "pyarrow": pa.__version__, "pandas": pd.__version__}


class RunWriter:
    """Appends rows to a run directory and keeps its manifest current (one writer per run: rank 0)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, config: Mapping[str, Any] | None = None,
                 hyperparameters: Mapping[str, Any] | None = None, symmetries: SymmetrySet | None = None,
                 tracker: Mapping[str, Any] | None = None):
        self.dir = Path(run_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for t in TABLES:
                (self.dir / t).mkdir(exist_ok=True)
        except OSError as e:
            raise RunStoreError(f"cannot create run directory {self.dir}: {e}", "pick a writable run_dir") from e
        self.manifest_path = self.dir / "manifest.json"
        self.existed = self.manifest_path.exists()
        if self.existed:
            try:
                self.manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
            except (OSError, ValueError) as e:
                raise RunStoreError(f"{self.manifest_path} is unreadable: {e}",
                                    "use a fresh run_dir or delete the broken manifest") from e
        else:
            self.manifest = {"schema_version": SCHEMA_VERSION, "created": _now(), "invalid": {}, "notes": []}
        self.manifest.update({
            "schema_version": SCHEMA_VERSION, "status": "running", "updated": _now(),
            "config": dict(config or self.manifest.get("config") or {}),
            "hyperparameters": dict(hyperparameters or self.manifest.get("hyperparameters") or {}),
            "versions": package_versions(),
            "tracker": dict(tracker or self.manifest.get("tracker") or {}),
        })
        if symmetries is not None:
            self.manifest["symmetries"] = json.loads(symmetries.to_json())
            self.manifest["symmetry_meta"] = json.loads(json.dumps(symmetries.meta, default=str))  # coverage, loss
        self.manifest.setdefault("invalid", {})
        self.manifest.setdefault("notes", [])
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._next = {t: (_parts(self.dir / t)[-1][0] + 1 if _parts(self.dir / t) else 0) for t in TABLES}
        self.write_manifest()

    # ---- manifest ---------------------------------------------------------------------------------
    def write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_bytes(self.manifest_path, json.dumps(self.manifest, indent=1, default=str).encode())

    def set_status(self, status: str, note: str | None = None) -> None:
        self.manifest["status"] = status
        if note:
            self.manifest["notes"].append(note)
        self.write_manifest()

    def add_note(self, note: str) -> None:
        self.manifest["notes"].append(note)

    def mark_invalid(self, group: str, reason: str) -> None:
        self.manifest["invalid"].setdefault(group, reason)

    # ---- rows -------------------------------------------------------------------------------------
    def append(self, table: str, columns: Mapping[str, Any]) -> None:
        """Buffer rows (a mapping column -> equal-length sequence/array) for the next flush."""
        schema = SCHEMAS[table]
        arrays = [pa.array(columns[name], type=typ) for name, typ in schema.items()]
        self._buffers[table].append(pa.Table.from_arrays(arrays, names=list(schema)))

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def flush(self) -> None:
        """Write each table's buffered rows as one new part, then the manifest (all atomically)."""
        for t in TABLES:
            if not self._buffers[t]:
                continue
            table = pa.concat_tables(self._buffers[t])
            atomic_write_table(self.dir / t / f"part-{self._next[t]:06d}.parquet", table)
            self._next[t] += 1
            self._buffers[t] = []
        self.write_manifest()

    def truncate_from(self, step: int) -> int:
        """Drop every stored row with step >= `step` (rewriting the parts that hold some); returns rows dropped."""
        dropped = 0
        for t in TABLES:
            self._buffers[t] = []
            for _, path in _parts(self.dir / t):
                try:
                    tab = pq.read_table(path)
                except Exception:
                    path.unlink()
                    continue
                steps = tab.column("step").to_pylist()
                keep = [i for i, s in enumerate(steps) if s < step]
                if len(keep) == len(steps):
                    continue
                dropped += len(steps) - len(keep)
                if keep:
                    atomic_write_table(path, tab.take(pa.array(keep, type=pa.int64())))
                else:
                    path.unlink()
        return dropped


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- reading ------------------------------------------------------------------------------------------
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

    def _table(self, name: str) -> pd.DataFrame:
        parts = _parts(self.dir / name)
        frames = []
        for i, (_, path) in enumerate(parts):
            try:
                frames.append(pq.read_table(path).to_pandas())
            except Exception as e:
                if i == len(parts) - 1:
                    warnings.warn(f"skipping corrupt or truncated last part {path} ({e}); "
                                  "the rows of that flush are lost", RuntimeWarning, stacklevel=3)
                    continue
                raise RunStoreError(f"part file {path} is corrupt: {e}",
                                    f"move {path} out of the run directory to read the rest") from e
        schema = SCHEMAS[name]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=_pandas_dtype(t)) for c, t in schema.items()})
        df = pd.concat(frames, ignore_index=True)
        df = df.drop_duplicates(subset=_KEYS[name], keep="last")
        return df.sort_values(_KEYS[name], kind="stable").reset_index(drop=True)

    def frame(self, kind: str | None = None, layer: str | None = None,
              groups: str | Sequence[str] | None = None) -> pd.DataFrame:
        """Long-form per-group time series: step, group, kind, layer, measured, predicted_* (NaN = n/a), ..."""
        df = self._table("groups")
        if kind is not None:
            df = df[df["kind"] == kind]
        if layer is not None:
            df = df[df["layer"] == layer]
        if groups is not None:
            df = df[df["group"].isin([groups] if isinstance(groups, str) else list(groups))]
        return df.reset_index(drop=True)

    def layers(self) -> pd.DataFrame:
        """Per (step, layer, kind) aggregates: relative errors, gradient norm, angular update, effective lr."""
        return self._table("layers")

    def metrics(self) -> pd.DataFrame:
        """What the training loop logged through `Tracker.log_metrics`: step, split, name, value."""
        return self._table("metrics")


def _pandas_dtype(t: pa.DataType) -> str:
    if t == pa.int64():
        return "int64"
    if t == pa.bool_():
        return "bool"
    if t == pa.float64():
        return "float64"
    return "object"


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
