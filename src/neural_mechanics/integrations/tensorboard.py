"""Per-layer aggregates of a run as TensorBoard scalars (needs the `tensorboard` package).

The run store is the source of truth; TensorBoard is a view: `write_scalars(run_dir)` replays the run's
`layers` table (one row per logged step, layer and kind: relative errors of the predictions, mean charge,
gradient norm, angular update, effective learning rate) and the training metrics into event files, so a
finished, a running or a crashed run can be looked at with `tensorboard --logdir`. Tags:
`{kind}/{layer}/{column}` for aggregates and `metrics/{split}/{name}` for metrics.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

LAYER_SCALARS = ("mean_charge", "err_exact_max", "err_exact_median", "err_breaking_max", "err_paper_max",
                 "err_paper_median", "grad_norm", "angular_update_median", "effective_lr_median", "lr", "n_valid")


def write_scalars(run_dir: str | os.PathLike[str], log_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the run's per-layer aggregates and metrics as scalars to `log_dir` (default RUN/tensorboard); return it.

    Non-finite values (a prediction that does not apply) are skipped, not written as NaN.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise ImportError("TensorBoard scalars need the `tensorboard` package (pip install tensorboard)") from exc

    from neural_mechanics.tracking.store import open_run

    run = open_run(run_dir)
    out = Path(log_dir) if log_dir is not None else run.dir / "tensorboard"
    writer = SummaryWriter(log_dir=str(out))
    try:
        rows: list[dict[Any, Any]] = run.layers().to_dict("records")
        for row in rows:
            for col in LAYER_SCALARS:
                v = float(row[col])
                if math.isfinite(v):
                    writer.add_scalar(f"{row['kind']}/{row['layer']}/{col}", v, int(row["step"]))
        rows = run.metrics().to_dict("records")
        for row in rows:
            if math.isfinite(float(row["value"])):
                writer.add_scalar(f"metrics/{row['split']}/{row['name']}", float(row["value"]), int(row["step"]))
    finally:
        writer.close()
    return out
