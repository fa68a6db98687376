"""The run directory's files: table names, schemas, part files, the group table, atomic writes.

What the files hold and why the directory has this shape is `store.py`; how the per-group rows are encoded is
`encoding.py`. This module is what the writer (`store.RunWriter`) and the reader (`reader.open_run`) share.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from neural_mechanics.errors import RunStoreError
from neural_mechanics.tracking.encoding import (
    CHARGE_COLUMNS,
    FRAME_COLUMNS,
    GROUP_TABLE_COLUMNS,
    STEP_COLUMNS,
    GroupTable,
    write_options,
)
from neural_mechanics.tracking.metrics import LAYER_AGGREGATES

__all__ = ["GROUP_TABLE", "KEYS", "LAYER_COLUMNS", "LEGACY_GROUPS", "METRIC_COLUMNS", "OPTIONS", "SCHEMAS",
           "SCHEMA_VERSION", "TABLES", "TABLE_DIRS", "atomic_write_bytes", "atomic_write_table", "parts",
           "read_group_table", "write_group_table"]

SCHEMA_VERSION = 2
"""1: the long form per row in groups/ (still read); 2: groups.parquet + charges/ + steps/ (`encoding.py`)."""
LEGACY_GROUPS = "groups"
"""Schema version 1: the long form, one row per (logged step, group), in `groups/part-*.parquet`."""
TABLES = ("steps", "charges", "layers", "metrics")
"""The part directories a run of this version writes, in flush order (a steps row before the charges rows
that read their lr from it)."""
TABLE_DIRS = (*TABLES, LEGACY_GROUPS)
"""Every directory of part files a run directory may hold."""
GROUP_TABLE = "groups.parquet"
KEYS = {"layers": ["step", "layer", "kind"], "metrics": ["step", "split", "name"], "steps": ["step"],
        LEGACY_GROUPS: ["step", "group"]}
"""Row keys per table (`open_run` keeps the last row per key); charges: (step, gid)."""

_LAYER_TYPES = {"step": pa.int64(), "layer": pa.string(), "kind": pa.string(), "n_groups": pa.int64(),
                "n_valid": pa.int64()}
LAYER_COLUMNS: dict[str, pa.DataType] = {c: _LAYER_TYPES.get(c, pa.float64()) for c in LAYER_AGGREGATES}
METRIC_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "split": pa.string(), "name": pa.string(), "value": pa.float64(),
}
SCHEMAS: dict[str, dict[str, pa.DataType]] = {"charges": CHARGE_COLUMNS, "steps": STEP_COLUMNS,
                                              "layers": LAYER_COLUMNS, "metrics": METRIC_COLUMNS,
                                              LEGACY_GROUPS: FRAME_COLUMNS}
OPTIONS: dict[str, dict[str, Any]] = {name: write_options(schema) for name, schema in SCHEMAS.items()}
"""`pyarrow.parquet.write_table` options per table."""
_PART = re.compile(r"^part-(\d{6,})\.parquet$")


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


def atomic_write_table(path: Path, table: pa.Table, options: Mapping[str, Any] | None = None) -> None:
    """Write a Parquet table to `path` atomically (temp file in the same dir, fsync, os.replace), with
    `pyarrow.parquet.write_table` options (`OPTIONS[table name]`) when given."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, **(options or {}))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def parts(table_dir: Path) -> list[tuple[int, Path]]:
    """(number, path) of the part files of one table directory, in order (temp files are not parts)."""
    if not table_dir.is_dir():
        return []
    out = []
    for p in table_dir.iterdir():
        m = _PART.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_group_table(run_dir: Path) -> GroupTable:
    """The run's group table (empty when it has none: a version-1 run, or no group logged yet)."""
    path = run_dir / GROUP_TABLE
    if not path.is_file():
        return GroupTable()
    try:
        return GroupTable.from_arrow(pq.read_table(path))
    except Exception as e:
        raise RunStoreError(f"{path} (the group table of the run) is unreadable: {e}",
                            "restore it from a backup; the rows in charges/ refer to its group ids") from e


def write_group_table(run_dir: Path, table: GroupTable) -> None:
    """Write groups.parquet atomically (before any charges part that names its new ids)."""
    atomic_write_table(run_dir / GROUP_TABLE, table.to_arrow(), write_options(GROUP_TABLE_COLUMNS))
