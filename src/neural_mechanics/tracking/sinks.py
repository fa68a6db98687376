"""Where a tracker's output goes: the run store (Parquet), nowhere, TensorBoard, or several of them.

The tracker computes rows; a sink persists them. Every sink takes the same calls, by column name:

    start(info)                     the run begins (config, hyperparameters, symmetries, tracker settings, facts)
    write_groups(columns)           one logged step: per-group rows (`tracking/rows.py`)
    write_layers(columns)           the same step's per (layer, kind) aggregates (`tracking/metrics.py`)
    write_metrics(columns)          training-loop metrics: step, split, name, value
    set_fact(key, value)            a run-level fact for the manifest (e.g. which predictions apply)
    mark_invalid(group, reason)     a group left the theory
    flush() / resume(step, invalid) / close(status, note)

* `ParquetSink(run_dir)`: the run directory of `tracking/store.py` (what `open_run` reads).
* `NullSink()`: nothing (no run_dir, or a rank other than 0 under DDP); the tracker then skips the log-step
  measurements altogether (`records` is False) and only advances its predictions.
* `TensorBoardSink(log_dir)`: live scalars of the per-layer aggregates (`{kind}/{layer}/{column}`) and of the
  metrics (`metrics/{split}/{name}`); non-finite values (a prediction that does not apply) are skipped. A resume
  purges the events from the resumed step on. `integrations/tensorboard.write_scalars` replays a stored run
  through it.
* `SinkGroup(sinks)`: several at once (the tracker builds one for `run_dir` plus `sink=`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neural_mechanics.symmetry.groups import SymmetrySet
from neural_mechanics.tracking.store import RunWriter

__all__ = ["LAYER_SCALARS", "NullSink", "ParquetSink", "RunInfo", "Sink", "SinkGroup", "TensorBoardSink"]

LAYER_SCALARS = ("mean_charge", "err_exact_max", "err_exact_median", "err_breaking_max", "err_paper_max",
                 "err_paper_median", "grad_norm", "angular_update_median", "effective_lr_median", "lr", "n_valid")
"""The per-layer aggregates `TensorBoardSink` writes as scalars."""

Columns = Mapping[str, Any]
"""Equal-length columns: name -> sequence or array."""


@dataclass
class RunInfo:
    """What a sink learns when the run starts."""

    config: Mapping[str, Any] | None = None
    hyperparameters: Mapping[str, Any] | None = None
    symmetries: SymmetrySet | None = None
    settings: Mapping[str, Any] | None = None
    """The tracker's settings (log_every, optimizer, strategy, ...)."""
    facts: Mapping[str, Any] = field(default_factory=dict)
    """Run-level facts known at the start (e.g. "not_applicable", "applicability")."""
    invalid: Mapping[str, str] = field(default_factory=dict)
    """Groups already out of the theory at the start, with the reason."""


class Sink:
    """The interface; this base class is also the null sink (every call does nothing, `records` is False)."""

    records: bool = False
    """True when the sink wants rows (the tracker measures log-step quantities only for such a sink)."""

    @property
    def run_dir(self) -> Path | None:
        """The run directory `open_run` can read, if this sink writes one."""
        return None

    @property
    def writer(self) -> RunWriter | None:
        """The run store writer, if this sink writes a run directory (the training loop appends to it)."""
        return None

    def start(self, info: RunInfo) -> None:
        """The run begins."""

    def write_groups(self, columns: Columns) -> None:
        """Rows of the groups table (equal-length columns)."""

    def write_layers(self, columns: Columns) -> None:
        """Rows of the layers table."""

    def write_metrics(self, columns: Columns) -> None:
        """Rows of the metrics table: step, split, name, value."""

    def set_fact(self, key: str, value: Any) -> None:
        """A run-level fact (manifest entry)."""

    def mark_invalid(self, group: str, reason: str) -> None:
        """A group left the theory (the first reason is kept)."""

    def flush(self) -> None:
        """Persist what is buffered."""

    def resume(self, step: int, invalid: Mapping[str, str]) -> None:
        """The run resumes at `step` from a checkpoint: drop what was written from that step on."""

    def close(self, status: str = "finished", note: str | None = None) -> None:
        """The run ends with `status` ("finished" or "failed"), with an optional note."""


class NullSink(Sink):
    """Writes nothing: a tracker without run_dir, or on a rank other than 0."""


class ParquetSink(Sink):
    """The run directory of `tracking/store.py`: manifest.json plus Parquet parts (see there)."""

    records = True

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.path = Path(run_dir)
        self._writer: RunWriter | None = None

    @property
    def run_dir(self) -> Path:
        return self.path

    @property
    def writer(self) -> RunWriter | None:
        return self._writer

    def _w(self) -> RunWriter:
        if self._writer is None:
            raise RuntimeError("ParquetSink used before start()")  # a bug in the caller, not user input
        return self._writer

    def start(self, info: RunInfo) -> None:
        w = self._writer = RunWriter(self.path, config=info.config, hyperparameters=info.hyperparameters,
                                     symmetries=info.symmetries, tracker=info.settings)
        w.manifest.update(info.facts)
        for name, reason in info.invalid.items():
            w.mark_invalid(name, reason)
        w.write_manifest()

    def write_groups(self, columns: Columns) -> None:
        self._w().append("groups", columns)

    def write_layers(self, columns: Columns) -> None:
        self._w().append("layers", columns)

    def write_metrics(self, columns: Columns) -> None:
        self._w().append("metrics", columns)

    def set_fact(self, key: str, value: Any) -> None:
        self._w().manifest[key] = value

    def mark_invalid(self, group: str, reason: str) -> None:
        self._w().mark_invalid(group, reason)

    def flush(self) -> None:
        self._w().flush()

    def resume(self, step: int, invalid: Mapping[str, str]) -> None:
        w = self._w()
        dropped = w.truncate_from(step)
        w.manifest["invalid"] = dict(invalid)
        w.add_note(f"resumed at step {step} (dropped {dropped} stored rows from step {step} on)")
        w.write_manifest()

    def close(self, status: str = "finished", note: str | None = None) -> None:
        w = self._w()
        w.flush()
        w.set_status(status, note)


class TensorBoardSink(Sink):
    """Per-layer aggregates and metrics as TensorBoard scalars in `log_dir` (needs the `tensorboard` package)."""

    records = True

    def __init__(self, log_dir: str | os.PathLike[str], scalars: Sequence[str] = LAYER_SCALARS):
        # imported here, not at module level: torch.utils.tensorboard needs the optional `tensorboard` package
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on what is installed
            raise ImportError("TensorBoard scalars need the `tensorboard` package (pip install tensorboard)") from exc
        self._summary_writer = SummaryWriter
        self.log_dir = Path(log_dir)
        self.scalars = tuple(scalars)
        self._tb = SummaryWriter(log_dir=str(self.log_dir))

    def _scalar(self, tag: str, value: Any, step: Any) -> None:
        v = float(value)
        if math.isfinite(v):
            self._tb.add_scalar(tag, v, int(step))

    def write_layers(self, columns: Columns) -> None:
        for i, step in enumerate(columns["step"]):
            prefix = f"{columns['kind'][i]}/{columns['layer'][i]}"
            for col in self.scalars:
                self._scalar(f"{prefix}/{col}", columns[col][i], step)

    def write_metrics(self, columns: Columns) -> None:
        for step, split, name, value in zip(columns["step"], columns["split"], columns["name"], columns["value"],
                                            strict=True):
            self._scalar(f"metrics/{split}/{name}", value, step)

    def flush(self) -> None:
        self._tb.flush()

    def resume(self, step: int, invalid: Mapping[str, str]) -> None:
        self._tb.close()
        self._tb = self._summary_writer(log_dir=str(self.log_dir), purge_step=int(step))

    def close(self, status: str = "finished", note: str | None = None) -> None:
        self._tb.close()


class SinkGroup(Sink):
    """Several sinks at once; `run_dir` / `writer` are the first member's that has one."""

    def __init__(self, sinks: Sequence[Sink]):
        self.sinks = list(sinks)
        self.records = any(s.records for s in self.sinks)

    @property
    def run_dir(self) -> Path | None:
        return next((s.run_dir for s in self.sinks if s.run_dir is not None), None)

    @property
    def writer(self) -> RunWriter | None:
        return next((s.writer for s in self.sinks if s.writer is not None), None)

    def start(self, info: RunInfo) -> None:
        for s in self.sinks:
            s.start(info)

    def write_groups(self, columns: Columns) -> None:
        for s in self.sinks:
            s.write_groups(columns)

    def write_layers(self, columns: Columns) -> None:
        for s in self.sinks:
            s.write_layers(columns)

    def write_metrics(self, columns: Columns) -> None:
        for s in self.sinks:
            s.write_metrics(columns)

    def set_fact(self, key: str, value: Any) -> None:
        for s in self.sinks:
            s.set_fact(key, value)

    def mark_invalid(self, group: str, reason: str) -> None:
        for s in self.sinks:
            s.mark_invalid(group, reason)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def resume(self, step: int, invalid: Mapping[str, str]) -> None:
        for s in self.sinks:
            s.resume(step, invalid)

    def close(self, status: str = "finished", note: str | None = None) -> None:
        for s in self.sinks:
            s.close(status, note)
