"""Per-layer aggregates of a run as TensorBoard scalars (needs the `tensorboard` package).

The run store is the source of truth; TensorBoard is a view. Live: pass `sink=TensorBoardSink(log_dir)` to the
Tracker (`tracking/sinks.py`). Afterwards: `write_scalars(run_dir)` replays the run's `layers` table (one row
per logged step, layer and kind: relative errors of the predictions, mean charge, gradient norm, angular update,
effective learning rate) and the training metrics through the same sink into event files, so a finished, a
running or a crashed run can be looked at with `tensorboard --logdir`. Tags: `{kind}/{layer}/{column}` for
aggregates and `metrics/{split}/{name}` for metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

from neural_mechanics.tracking.sinks import LAYER_SCALARS, TensorBoardSink
from neural_mechanics.tracking.store import open_run

__all__ = ["LAYER_SCALARS", "write_scalars"]


def write_scalars(run_dir: str | os.PathLike[str], log_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the run's per-layer aggregates and metrics as scalars to `log_dir` (default RUN/tensorboard); return it.

    Non-finite values (a prediction that does not apply) are skipped, not written as NaN.
    """
    run = open_run(run_dir)
    out = Path(log_dir) if log_dir is not None else run.dir / "tensorboard"
    sink = TensorBoardSink(out)
    try:
        layers = run.layers()
        sink.write_layers({c: layers[c].tolist() for c in layers.columns})
        metrics = run.metrics()
        sink.write_metrics({c: metrics[c].tolist() for c in metrics.columns})
    finally:
        sink.close()
    return out
