"""How the groups frame is stored: group ids into a table kept once, per-step constants apart, floats by budget.

`Run.frame()` returns the long form (`FRAME_COLUMNS`, docs/contract.md): one row per (logged step, group) with the
group's name, kind and layer. Written that way, 11.5k groups cost 1.2 MB per logged step (strings per row, twelve
float64 columns in Parquet's plain encoding). Run directories of schema version 2 store it as three tables:

    groups.parquet          one row per group: gid (int32), group (the symmetry's name), kind, layer. Written when
                            the run starts and rewritten (atomically) only when a group is added; ids never change.
    charges/part-*.parquet  one row per (logged step, group): step, gid and the stored columns below.
    steps/part-*.parquet    one row per logged step: step, lr (null when the groups' learning rates differ).

The precision budget of each frame column, i.e. what is stored for it (`precision.py` rounds each value's
significand to the bits its budget keeps; the column keeps its type, the zeroed bits compress away):

    measured             float64  exact: the charge itself, which every exactness check compares against (the
                                  exact recurrence at 1e-10 of the norm, a resumed run against an uninterrupted
                                  one bit for bit)
    predicted_exact      float32 deviation `delta_exact = predicted_exact - measured`, and likewise delta_breaking,
    predicted_breaking   delta_paper: predicted = measured + delta in float64 is exact to max(2^-37 norm, 2^-24
    predicted_paper      |predicted - measured|) + half an ulp of measured (+ 1.4e-45, float32's smallest step).
                         Every use of a prediction reads its error |predicted - measured| / norm: the tightest check
                         (1e-10 of the norm, against a float64 reference) is 14x coarser than 2^-37; the error
                         figures read the error itself, which keeps 8 significant bits at worst (2^-9 relative,
                         0.002 decades on their log axes) and all of float32's 24 where it exceeds 2^-13 of the
                         norm (the paper's approximate predictions). Where measured is not finite (a diverged
                         step) delta_* holds the prediction itself (float32, all bits).
    breaking             not stored: predicted_breaking - predicted_exact, formed on reading
    breaking_term        float64, 36 significand bits: 2^-37 relative; B_k is compared with float64 references at
                         1e-10 of max(1, |B|) and is the only measurement of a non-SGD run
    lr                   float64  exact, in the steps table; per row (charges' `lr`) only at steps whose groups differ
    norm                 float32, 15 bits: 2^-16 relative, the relative error's denominator (an error read to five
                         digits); null where it equals |measured| (scale groups), which then stands for it exactly
    grad_norm            float32, 15 bits: 2^-16 relative; figures only (|g_A|, the per-layer gradient norm)
    angular_update       float32, 15 bits: figures only
    predicted_equilibrium, angular_update_eq, relaxation_time, update_ratio
                         float32, 15 bits: figures and the equilibrium regime check only; five significant digits
                         are 60x finer than a figure resolves (1e-3 of an axis)
    valid                bool

Float columns are written with Parquet's BYTE_STREAM_SPLIT encoding (a float's bytes in separate streams, so
zstd finds the repetitive sign and exponent bytes and the zeroed low ones), gid and step as deltas / run lengths,
everything zstd-compressed (level 7), and each part group-major: rows in (gid, step) order, a group's values over
the part's steps side by side (`group_major`; read back step-major, `step_major`). About 0.21 MB per logged step
for the paper's VGG-16-BN, 18.0 bytes per group row (benchmarks/store_size.py, which also projects a full paper
run's directory). Reading with plain pandas is a join (docs/contract.md, "The run directory"):

    ch = pd.read_parquet("RUN/charges")
    ch = ch.astype({c: "float64" for c in ch.columns if ch[c].dtype == "float32"})
    ch = ch.merge(pd.read_parquet("RUN/groups.parquet"), on="gid")
    ch = ch.merge(pd.read_parquet("RUN/steps"), on="step", suffixes=("", "_step"))
    ch["lr"] = ch["lr"].fillna(ch["lr_step"])
    ch["norm"] = ch["norm"].fillna(ch["measured"].abs())
    ch["predicted_exact"] = ch["measured"] + ch["delta_exact"]        # likewise breaking, paper
    ch = ch.sort_values(["step", "gid"])

`roundtrip` is what a row becomes once stored and read back; the tracker computes its per-layer aggregates from
it, so the layers table and the errors recomputed from the groups frame agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from neural_mechanics.tracking.metrics import EQUILIBRIUM_COLUMNS, PREDICTION_COLUMNS
from neural_mechanics.tracking.precision import BREAKING_TERM_BITS, FIGURE_BITS, delta_bits, round_significand

__all__ = ["CHARGE_COLUMNS", "FRAME_COLUMNS", "GROUP_TABLE_COLUMNS", "STEP_COLUMNS", "GroupTable", "decode",
           "delta_column", "encode", "group_major", "roundtrip", "step_major", "write_options"]

FRAME_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "group": pa.string(), "kind": pa.string(), "layer": pa.string(),
    "measured": pa.float64(), **dict.fromkeys(PREDICTION_COLUMNS, pa.float64()), "breaking": pa.float64(),
    "breaking_term": pa.float64(), "lr": pa.float64(), "norm": pa.float64(), "grad_norm": pa.float64(),
    "angular_update": pa.float64(), **dict.fromkeys(EQUILIBRIUM_COLUMNS, pa.float64()), "valid": pa.bool_(),
}
"""The long form `Run.frame()` returns (docs/contract.md), in order."""


def delta_column(prediction: str) -> str:
    """The stored deviation of a prediction column: "predicted_exact" -> "delta_exact"."""
    return "delta_" + prediction.removeprefix("predicted_")


_DELTAS = {p: delta_column(p) for p in PREDICTION_COLUMNS}
_FIGURES_ONLY = ("grad_norm", "angular_update", *EQUILIBRIUM_COLUMNS)
"""Columns read by figures and the equilibrium regime check only: float32 (seven significant digits)."""
_FLOAT32 = ("norm", *_FIGURES_ONLY)
CHARGE_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "gid": pa.int32(), "measured": pa.float64(), **dict.fromkeys(_DELTAS.values(), pa.float32()),
    "breaking_term": pa.float64(), "lr": pa.float64(), **dict.fromkeys(_FLOAT32, pa.float32()), "valid": pa.bool_(),
}
"""The charges table (one row per logged step and group), as stored."""
GROUP_TABLE_COLUMNS: dict[str, pa.DataType] = {"gid": pa.int32(), "group": pa.string(), "kind": pa.string(),
                                               "layer": pa.string()}
STEP_COLUMNS: dict[str, pa.DataType] = {"step": pa.int64(), "lr": pa.float64()}


def write_options(schema: Mapping[str, pa.DataType]) -> dict[str, Any]:
    """`pyarrow.parquet.write_table` options for a table: zstd; floats byte-stream-split; ids as deltas.

    zstd level 7: a charges part of 20 logged steps x 11.5k groups (rows rounded to their budgets, group-major)
    takes ~0.09 s to compress on one core (4.5 ms per logged step, on the training thread at a flush); zstd's
    default level 3 writes it in 0.04 s with 2% more bytes, level 9 in 0.19 s with 0.3% fewer.
    """
    floats = [c for c, t in schema.items() if pa.types.is_floating(t)]
    encoding = {c: "BYTE_STREAM_SPLIT" for c in floats}
    if "gid" in schema:
        encoding["gid"] = "DELTA_BINARY_PACKED"
    return {"compression": "zstd", "compression_level": 7, "column_encoding": encoding,
            "use_dictionary": [c for c in schema if c not in encoding]}


# ---- values ---------------------------------------------------------------------------------------------------
def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _store_values(cols: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Frame columns -> stored numpy values (and a null mask where the column has one), minus lr; each rounded to
    its budget (`precision.py`)."""
    m = _f64(cols["measured"])
    finite = np.isfinite(m)
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {"measured": (m, None)}
    out["breaking_term"] = (round_significand(_f64(cols["breaking_term"]), BREAKING_TERM_BITS), None)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = _f64(cols["norm"])
        same = norm == np.abs(m)
        stored_norm = round_significand(norm.astype(np.float32), FIGURE_BITS)
        read_norm = np.where(same, np.abs(m), stored_norm)  # the norm as it reads back: the deltas' scale
        out["norm"] = (stored_norm, same)
        for pred, delta in _DELTAS.items():
            p = _f64(cols[pred])
            d = np.where(finite, p - m, p).astype(np.float32)
            out[delta] = (np.where(finite, round_significand(d, delta_bits(d, read_norm)), d), None)
        for c in _FIGURES_ONLY:
            out[c] = (round_significand(_f64(cols[c]).astype(np.float32), FIGURE_BITS), None)
    return out


def _frame_values(stored: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Stored values (null read as NaN, `norm_null` the norm's null mask) -> float64 frame columns."""
    m = _f64(stored["measured"])
    finite = np.isfinite(m)
    out = {"measured": m}
    for pred, delta in _DELTAS.items():
        d = _f64(stored[delta])
        out[pred] = np.where(finite, m + d, d)
    out["breaking"] = out["predicted_breaking"] - out["predicted_exact"]
    out["breaking_term"] = _f64(stored["breaking_term"])
    out["norm"] = np.where(np.asarray(stored["norm_null"], dtype=bool), np.abs(m), _f64(stored["norm"]))
    for c in _FIGURES_ONLY:
        out[c] = _f64(stored[c])
    return out


def roundtrip(cols: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The float columns of a groups frame as they read back once stored (see the module docstring)."""
    values = _store_values(cols)
    stored: dict[str, Any] = {c: v for c, (v, _) in values.items()}
    stored["norm_null"] = values["norm"][1]
    return _frame_values(stored)


# ---- group ids -------------------------------------------------------------------------------------------------
class GroupTable:
    """Group name -> gid (int32, in order of first appearance), with each group's kind and layer. Only grows."""

    def __init__(self, names: Iterable[str] = (), kinds: Iterable[str] = (), layers: Iterable[str] = ()):
        self.names: list[str] = []
        self.kinds: list[str] = []
        self.layers: list[str] = []
        self._index: dict[str, int] = {}
        self._lookup: pd.Index | None = None
        self.add(list(names), list(kinds), list(layers))

    def __len__(self) -> int:
        return len(self.names)

    def add(self, names: list[str], kinds: list[str], layers: list[str]) -> bool:
        """Add the groups not yet in the table (first kind and layer seen win); True when some were new."""
        before = len(self.names)
        for name, kind, layer in zip(names, kinds, layers, strict=True):
            if name not in self._index:
                self._index[name] = len(self.names)
                self.names.append(name)
                self.kinds.append(kind)
                self.layers.append(layer)
        if len(self.names) != before:
            self._lookup = None
        return len(self.names) != before

    def ids(self, names: Any, kinds: Any, layers: Any) -> tuple[np.ndarray, bool]:
        """(gid per row, whether the table grew) for rows of groups named `names` (added when unknown)."""
        if self._lookup is None:
            self._lookup = pd.Index(self.names)
        gid = self._lookup.get_indexer(pd.Index(np.asarray(names, dtype=object)))
        grew = False
        if (gid < 0).any():
            new = np.flatnonzero(gid < 0)
            grew = self.add([str(names[i]) for i in new], [str(kinds[i]) for i in new], [str(layers[i]) for i in new])
            self._lookup = pd.Index(self.names)
            gid = self._lookup.get_indexer(pd.Index(np.asarray(names, dtype=object)))
        return gid.astype(np.int32), grew

    def to_arrow(self) -> pa.Table:
        return pa.table({"gid": pa.array(np.arange(len(self), dtype=np.int32)),
                         "group": pa.array(self.names, pa.string()), "kind": pa.array(self.kinds, pa.string()),
                         "layer": pa.array(self.layers, pa.string())})

    @classmethod
    def from_arrow(cls, table: pa.Table) -> GroupTable:
        order = np.argsort(table.column("gid").to_numpy(), kind="stable")
        t = table.take(pa.array(order))
        if not np.array_equal(t.column("gid").to_numpy(), np.arange(len(t))):
            raise ValueError("group ids are not 0..n-1")
        return cls(t.column("group").to_pylist(), t.column("kind").to_pylist(), t.column("layer").to_pylist())


# ---- tables ----------------------------------------------------------------------------------------------------
def encode(cols: Mapping[str, Any], gid: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """(charges rows, steps rows) of groups-frame columns whose groups have ids `gid`."""
    step = np.asarray(cols["step"], dtype=np.int64)
    lr = _f64(cols["lr"])
    steps, first, inverse = np.unique(step, return_index=True, return_inverse=True)
    step_lr = lr[first]
    same = (lr == step_lr[inverse]) | (np.isnan(lr) & np.isnan(step_lr[inverse]))
    uniform = np.bincount(inverse, weights=(~same).astype(np.float64), minlength=len(steps)) == 0
    values = _store_values(cols)
    arrays: dict[str, pa.Array] = {"step": pa.array(step), "gid": pa.array(np.asarray(gid, dtype=np.int32)),
                                   "lr": pa.array(lr, mask=uniform[inverse])}
    for c, (v, null) in values.items():
        arrays[c] = pa.array(v, type=CHARGE_COLUMNS[c], mask=null)
    arrays["valid"] = pa.array(np.asarray(cols["valid"], dtype=bool))
    charges = pa.table({c: arrays[c] for c in CHARGE_COLUMNS})
    step_table = pa.table({"step": pa.array(steps), "lr": pa.array(step_lr, mask=~uniform)})
    return charges, step_table


def group_major(charges: pa.Table) -> pa.Table:
    """Charges rows in (gid, step) order, the order a part is written in: each group's values over the part's steps
    side by side, whose sign, exponent and leading significand bytes repeat (3% fewer bytes than step-major)."""
    return charges.sort_by([("gid", "ascending"), ("step", "ascending")])


def step_major(charges: pa.Table) -> pa.Table:
    """Charges rows in (step, gid) order, stably (rows of the same key keep their order): how a part is read."""
    step = charges.column("step").to_numpy()
    gid = charges.column("gid").to_numpy()
    if len(step) < 2 or bool(np.all((step[1:] > step[:-1]) | ((step[1:] == step[:-1]) & (gid[1:] > gid[:-1])))):
        return charges
    return charges.take(pa.array(np.lexsort((gid, step))))


def decode(charges: pa.Table, steps: pa.Table, groups: GroupTable) -> pd.DataFrame:
    """The long form (`FRAME_COLUMNS`) of charges rows, with the steps table and the group table."""
    step = charges.column("step").to_numpy()
    gid = charges.column("gid").to_numpy()
    # a column the writer did not have yet (the equilibrium columns) reads as NaN
    stored: dict[str, Any] = {c: charges.column(c).to_numpy(zero_copy_only=False) if c in charges.column_names
                              else np.full(len(charges), np.nan) for c in
                              ("measured", "breaking_term", *_DELTAS.values(), *_FLOAT32)}
    stored["norm_null"] = charges.column("norm").is_null().to_numpy(zero_copy_only=False)
    values = _frame_values(stored)
    lr = charges.column("lr").to_numpy(zero_copy_only=False)
    if len(steps):
        st = steps.column("step").to_numpy()
        pos = np.searchsorted(st, step).clip(0, len(st) - 1)
        step_lr = np.where(st[pos] == step, steps.column("lr").to_numpy(zero_copy_only=False)[pos], np.nan)
        lr = np.where(charges.column("lr").is_null().to_numpy(zero_copy_only=False), step_lr, lr)
    names = pd.array(groups.names, dtype="str")
    kinds = pd.array(groups.kinds, dtype="str")
    layers = pd.array(groups.layers, dtype="str")
    out = {"step": step.astype(np.int64), "group": names.take(gid), "kind": kinds.take(gid),
           "layer": layers.take(gid), **values, "lr": lr.astype(np.float64),
           "valid": charges.column("valid").to_numpy(zero_copy_only=False).astype(bool)}
    return pd.DataFrame({c: out[c] for c in FRAME_COLUMNS})
