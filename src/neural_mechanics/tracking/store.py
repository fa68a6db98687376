"""The run directory: a JSON manifest plus append-only Parquet part files, safe to kill at any moment.

Layout of a run directory (schema version 2)::

    manifest.json                     schema version, status, config, hyperparameters, versions,
                                      symmetry table, invalid groups (with reasons), notes
    groups.parquet                    one row per group: gid, group (name), kind, layer
    charges/part-000000.parquet ...   one row per (logged step, group): step, gid, measured, delta_*, ...
    steps/part-000000.parquet ...     one row per logged step: step, lr
    layers/part-000000.parquet ...    one row per (logged step, layer, kind): aggregates
    metrics/part-000000.parquet ...   (step, split, name, value) appended by the training loop

`open_run(dir).frame()` (`reader.py`) joins groups, charges and steps back into the long form of docs/contract.md;
how the columns are stored - integer group ids into a table kept once, the lr per step, float32 where a column's
precision budget allows and float64 where comparisons at 1e-10 need it, each value's significand rounded to the bits
its budget keeps (`precision.py`), parts written group-major - is `encoding.py`; file names, schemas and
atomic writes are `layout.py`. Runs of schema version 1 kept the long form itself in `groups/part-*.parquet`; they
still open, and a version-1 run resumed by this version gets its new rows in version 2 beside them.

Why this shape: a training run can die at any time (pre-emption, OOM, Ctrl-C). Every flush writes a *new*
part (temp file in the same directory -> fsync -> os.replace), and the manifest is replaced the same way,
so a reader sees either the old or the new state, never half a file. What rows refer to is written first: the
group table before charges naming a new group, a step's steps row before its charges. Temp files start with "."
so pandas / pyarrow / polars / duckdb skip them when reading a table directory, and none of those needs this
package to read the data (`pandas.read_parquet("run/charges")`, joined as `encoding.py` shows).

Resuming: a run resumed from a checkpoint at step K would re-log steps >= K. The writer *truncates on resume*:
`truncate_from(K)` rewrites (atomically) every part holding rows with step >= K without them, so the directory
never holds duplicates, even for readers that do not use this package. `open_run` additionally de-duplicates
on (step, group) / (step, layer, kind) / (step, split, name) / step keeping the row of the latest part, in case a
run was killed between a resume and its truncation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from neural_mechanics.errors import RunStoreError
from neural_mechanics.symmetry.groups import SymmetrySet
from neural_mechanics.tracking.encoding import FRAME_COLUMNS, encode, group_major
from neural_mechanics.tracking.layout import (
    GROUP_TABLE,
    LAYER_COLUMNS,
    LEGACY_GROUPS,
    METRIC_COLUMNS,
    OPTIONS,
    SCHEMA_VERSION,
    SCHEMAS,
    TABLE_DIRS,
    TABLES,
    atomic_write_bytes,
    atomic_write_table,
    parts,
    read_group_table,
    write_group_table,
)
from neural_mechanics.tracking.reader import Run, last_per_step, open_run

__all__ = ["GROUP_COLUMNS", "LAYER_COLUMNS", "METRIC_COLUMNS", "SCHEMA_VERSION", "TABLE_DIRS", "Run", "RunWriter",
           "atomic_write_bytes", "atomic_write_table", "open_run", "package_versions"]

GROUP_COLUMNS = FRAME_COLUMNS
"""The columns of `Run.frame()` (the contract's long form; stored as `encoding.py` says)."""


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
        self._symmetries_json: tuple[Any, str] | None = None
        """(the manifest's symmetries list, its JSON text): serialised once, not at every manifest write."""
        self.groups = read_group_table(self.dir)
        """gid <-> group name, kind, layer (groups.parquet); only grows, as rows name new groups."""
        self._groups_written = len(self.groups)
        if symmetries is not None:
            text = symmetries.to_json()
            self.manifest["symmetries"] = json.loads(text)
            self._symmetries_json = (self.manifest["symmetries"], text)
            self.groups.add([s.name for s in symmetries], [s.kind for s in symmetries], [s.layer for s in symmetries])
            self.manifest["symmetry_meta"] = json.loads(json.dumps(symmetries.meta, default=str))  # coverage, loss
        self.manifest.setdefault("invalid", {})
        self.manifest.setdefault("notes", [])
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._next = {t: (parts(self.dir / t)[-1][0] + 1 if parts(self.dir / t) else 0) for t in TABLES}
        self._write_groups()
        self.write_manifest()

    # ---- manifest ---------------------------------------------------------------------------------
    def write_manifest(self) -> None:
        """Replace manifest.json atomically (the symmetry table, most of its bytes, is serialised once)."""
        self.manifest["updated"] = _now()
        syms = self.manifest.get("symmetries")
        text = json.dumps({k: v for k, v in self.manifest.items() if k != "symmetries"}, indent=1, default=str)
        if syms is not None:
            if self._symmetries_json is None or self._symmetries_json[0] is not syms:
                self._symmetries_json = (syms, json.dumps(syms, default=str))
            text = f'{text[:-2]},\n "symmetries": {self._symmetries_json[1]}\n}}'
        atomic_write_bytes(self.manifest_path, text.encode())

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
        """Buffer rows (a mapping column -> equal-length sequence/array) for the next flush.

        "groups": the long form of `Run.frame()` (its columns; `breaking` is not read), stored as charges and
        steps rows (`encoding.encode`) with the group ids of `self.groups`; "layers", "metrics": their columns.
        """
        if table == LEGACY_GROUPS:
            gid, _ = self.groups.ids(columns["group"], columns["kind"], columns["layer"])
            charges, steps = encode(columns, gid)
            self._buffers["charges"].append(charges)
            self._buffers["steps"].append(steps)
            return
        schema = SCHEMAS[table]
        arrays = [pa.array(columns[name], type=typ) for name, typ in schema.items()]
        self._buffers[table].append(pa.Table.from_arrays(arrays, names=list(schema)))

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def _write_groups(self) -> None:
        """groups.parquet, when groups were added since it was last written (before any row naming them)."""
        exists = (self.dir / GROUP_TABLE).exists()
        if len(self.groups) == self._groups_written and (exists or not len(self.groups)):
            return
        write_group_table(self.dir, self.groups)
        self._groups_written = len(self.groups)

    def flush(self) -> None:
        """Write each table's buffered rows as one new part, then the manifest (all atomically)."""
        self._write_groups()
        for t in TABLES:
            if not self._buffers[t]:
                continue
            table = pa.concat_tables(self._buffers[t])
            if t == "steps":
                table = last_per_step(table)
            elif t == "charges":
                table = group_major(table)
            atomic_write_table(self.dir / t / f"part-{self._next[t]:06d}.parquet", table, OPTIONS[t])
            self._next[t] += 1
            self._buffers[t] = []
        self.write_manifest()

    def truncate_from(self, step: int) -> int:
        """Drop every stored row with step >= `step` (rewriting the parts that hold some); returns rows dropped
        from the per-group (charges, or a version-1 run's groups), layers and metrics tables."""
        dropped = 0
        for t in (LEGACY_GROUPS, "charges", "layers", "metrics", "steps"):  # steps last: charges read lr there
            if t in self._buffers:
                self._buffers[t] = []
            for _, path in parts(self.dir / t):
                try:
                    tab = pq.read_table(path)
                except Exception:
                    path.unlink()
                    continue
                keep = pc.less(tab.column("step"), step)
                n_keep = int(pc.sum(keep).as_py() or 0)
                if n_keep == len(tab):
                    continue
                if t != "steps":
                    dropped += len(tab) - n_keep
                if n_keep:
                    atomic_write_table(path, tab.filter(keep), OPTIONS[t])
                else:
                    path.unlink()
        return dropped


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
