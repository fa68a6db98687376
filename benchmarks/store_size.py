"""Bytes on disk per logged step of the run store, for the paper's VGG-16-BN (11,521 groups): target <= 0.3 MB; and
what a full paper run's directory holds at its end: target <= 1 GB.

    .venv/bin/python benchmarks/store_size.py [--steps 20] [--batch 8] [--flush 20] [--threads 1]

Realistic values: the paper's model (Tiny ImageNet variant, 200 classes, 64x64, train mode) is trained for `--steps`
steps (SGD, heavy-ball momentum 0.9, lr 0.1, weight decay 1e-4: the paper's momentum run, random data standing in
for Tiny ImageNet) with a Tracker logging every step into a run directory, `--flush` logged steps per part (a paper
run logs every 10 steps and flushes every 200: 20 logged steps per part). The same rows, recorded by a second sink,
are written in the previous layout (schema version 1: the long form, strings and twelve float64 columns per row,
pyarrow's default options) with the same parts, so both formats are measured on identical values in one run.

The run directory is filled as `nmech train` fills it: the training loop's "train" metrics (loss, accuracy, lr) at
every logged step, the parameter trace (`param_trace.parquet`, one sample per logged step), the step-0 constraint
check (`constraints.parquet`), the checkpoint (`checkpoint.pt`: model, optimizer, tracker state; one file, replaced
at each save, so one stays on disk) and the report (`report.html`).

Printed: MB per logged step of each format (the per-row tables), their ratio, the verdict against the target, the
stored bytes per row of every column of the charges table, and the projected size of the full paper run: the
config `vgg16-bn-tinyimagenet-momentum0.9` (the other VGG-16-BN configs have the same steps and logging) runs
100 epochs of 100,000 // 256 = 390 steps (drop_last, as `experiments/train.py` loads) = 39,000 steps, logged where
the tracker logs (every 10th step, the log-spaced early steps, the final state): every per-logged-step file
(charges, steps, layers, metrics, the parameter trace) scaled by that count, plus the files written once (manifest,
group table, checkpoint, constraints, report) as measured here.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from neural_mechanics.constraints.check import check_constraints
from neural_mechanics.experiments.checkpoint import atomic_save
from neural_mechanics.experiments.config import TrainConfig, load_config
from neural_mechanics.experiments.models import vgg16
from neural_mechanics.experiments.objectives import build_objective
from neural_mechanics.plots.report import write_report
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking.param_trace import ParamTrace
from neural_mechanics.tracking.sinks import Sink
from neural_mechanics.tracking.step_hooks import is_spaced
from neural_mechanics.tracking.store import atomic_write_table, open_run
from neural_mechanics.tracking.tracker import Tracker

TARGET_MB = 0.3
TARGET_RUN_GB = 1.0
PAPER_CONFIG = "vgg16-bn-tinyimagenet-momentum0.9"
TINY_IMAGENET_TRAIN = 100_000
"""Training images of Tiny ImageNet (200 classes x 500)."""
PER_LOGGED_STEP = ("charges", "steps", "layers", "metrics", "param_trace.parquet")
ONCE = ("manifest.json", "groups.parquet", "checkpoint.pt", "constraints.parquet", "report.html")
V1_TYPES = {"step": pa.int64(), "group": pa.string(), "kind": pa.string(), "layer": pa.string(), "valid": pa.bool_()}
V1_COLUMNS = ["step", "group", "kind", "layer", "measured", "predicted_exact", "predicted_breaking", "predicted_paper",
              "breaking", "breaking_term", "lr", "norm", "grad_norm", "angular_update", "valid"]


class Recorder(Sink):
    """Keeps the groups / layers columns the tracker hands its sinks, one entry per logged step."""

    records = True

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []
        self.layers: list[dict[str, Any]] = []

    def write_groups(self, columns: Any) -> None:
        self.groups.append({k: np.asarray(v).copy() for k, v in columns.items()})

    def write_layers(self, columns: Any) -> None:
        self.layers.append({k: list(v) for k, v in columns.items()})


def write_v1(out: Path, rec: Recorder, per_part: int) -> None:
    """The schema-version-1 layout of the recorded rows (what the previous RunWriter wrote), same parts."""
    for t in ("groups", "layers"):
        (out / t).mkdir(parents=True)
    for i in range(0, len(rec.groups), per_part):
        chunk = rec.groups[i:i + per_part]
        arrays = [pa.array(np.concatenate([c[name] for c in chunk]), type=V1_TYPES.get(name, pa.float64()))
                  for name in V1_COLUMNS]
        pq.write_table(pa.Table.from_arrays(arrays, names=V1_COLUMNS), out / "groups" / f"part-{i:06d}.parquet")
        lay = rec.layers[i:i + per_part]
        cols = {k: [v for c in lay for v in c[k]] for k in lay[0]}
        pq.write_table(pa.table(cols), out / "layers" / f"part-{i:06d}.parquet")


def table_bytes(run_dir: Path, tables: tuple[str, ...]) -> dict[str, int]:
    return {t: sum(p.stat().st_size for p in (run_dir / t).glob("part-*.parquet")) for t in tables}


def file_bytes(run_dir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Bytes of each file, or of each table directory's part files."""
    return {n: (run_dir / n).stat().st_size if (run_dir / n).is_file() else table_bytes(run_dir, (n,))[n]
            for n in names}


def paper_run(cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, logged steps) of a full run of `cfg` on Tiny ImageNet: drop_last batches per epoch as
    `experiments/train.py` loads them; logged where the tracker logs (`Tracker._is_log_step`: every log_every-th
    step and, with log_spaced, the log-spaced early ones), the final state included (`Tracker.close`)."""
    total = (TINY_IMAGENET_TRAIN // cfg.batch_size) * int(cfg.epochs or 0) if cfg.steps is None else cfg.steps
    t = cfg.tracker
    logged = sum(1 for k in range(total + 1) if k % t.log_every == 0 or (t.log_spaced and is_spaced(k)))
    return total, logged


def column_bytes(run_dir: Path, table: str) -> dict[str, int]:
    """Compressed bytes per column over every part of a table (Parquet column-chunk metadata)."""
    out: dict[str, int] = {}
    for path in sorted((run_dir / table).glob("part-*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                out[col.path_in_schema] = out.get(col.path_in_schema, 0) + col.total_compressed_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps, each one logged")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--flush", type=int, default=20, help="logged steps per part file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg16(200, 64, batch_norm=True).train()
    x, y = torch.randn(args.batch, 3, 64, 64), torch.randint(0, 200, (args.batch,))
    syms = find_symmetries(model, x[:4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rec = Recorder()
    root = Path(tempfile.mkdtemp(prefix="nm-store-size-"))
    run_dir = root / "new"
    t0 = time.perf_counter()
    with Tracker(model, opt, syms, run_dir, log_every=1, flush_every=args.flush, sink=rec) as tracker:
        writer = tracker.writer
        assert writer is not None
        trace = ParamTrace(model, opt, syms, every=1)
        for k in range(args.steps):
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            acc = float((logits.argmax(1) == y).float().mean())
            writer.append("metrics", {"step": [k + 1] * 3, "split": ["train"] * 3, "name": ["loss", "accuracy", "lr"],
                                      "value": [float(loss.detach()), acc, 0.1]})  # as TrainMetrics logs them
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "tracker": tracker.state_dict()},
                    run_dir / "checkpoint.pt")
    train_s = time.perf_counter() - t0
    trace.close()
    trace.save(run_dir)
    report = check_constraints(model, build_objective("cross_entropy").spec, (x, y), syms, hessian=False)
    atomic_write_table(run_dir / "constraints.parquet", pa.Table.from_pandas(report.to_frame(), preserve_index=False))
    t1 = time.perf_counter()
    write_report(run_dir, constraints=report, param_trace=pd.read_parquet(run_dir / "param_trace.parquet"))
    report_s = time.perf_counter() - t1
    write_v1(root / "old", rec, args.flush)
    logged = len(rec.groups)
    new = table_bytes(run_dir, ("charges", "steps", "layers"))
    old = table_bytes(root / "old", ("groups", "layers"))
    new_mb, old_mb = sum(new.values()) / logged / 1e6, sum(old.values()) / logged / 1e6
    frame = open_run(run_dir).frame()
    assert len(frame) == logged * len(syms), "the store lost rows"
    c = syms.counts()
    print(f"VGG-16-BN (Tiny ImageNet variant): {len(syms)} groups (translation {c['translation']}, scale {c['scale']}, "
          f"rescale {c['rescale']}); {logged} logged steps of training (batch {args.batch}, {train_s:.0f} s), "
          f"{args.flush} logged steps per part")
    print(f"  new layout (schema 2): {new_mb:.3f} MB per logged step  "
          f"[target <= {TARGET_MB} MB: {'met' if new_mb <= TARGET_MB else 'NOT met'}]  "
          + ", ".join(f"{t} {b / logged / 1e6:.4f}" for t, b in new.items()))
    print(f"  old layout (schema 1): {old_mb:.3f} MB per logged step  "
          + ", ".join(f"{t} {b / logged / 1e6:.4f}" for t, b in old.items()))
    print(f"  old / new: x{old_mb / new_mb:.2f}")
    rows = logged * len(syms)
    per_col = column_bytes(run_dir, "charges")
    print("  charges bytes per row: " + ", ".join(f"{k} {v / rows:.2f}" for k, v in per_col.items())
          + f" (total {sum(per_col.values()) / rows:.2f})")

    cfg = load_config(PAPER_CONFIG)
    total, paper_logged = paper_run(cfg)
    per_step = {n: b / logged for n, b in file_bytes(run_dir, PER_LOGGED_STEP).items()}
    once = file_bytes(run_dir, ONCE)
    run_bytes = sum(per_step.values()) * paper_logged + sum(once.values())
    gb = run_bytes / 1e9
    print(f"full paper run ({PAPER_CONFIG}: {total} steps, {paper_logged} logged: every {cfg.tracker.log_every}th, "
          f"log-spaced early steps, the final state) = per logged step x {paper_logged} + once:")
    print("  per logged step: " + ", ".join(f"{n} {b / 1e6:.4f} MB" for n, b in per_step.items())
          + f" (sum {sum(per_step.values()) / 1e6:.4f} MB) -> {sum(per_step.values()) * paper_logged / 1e9:.3f} GB")
    print("  once: " + ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in once.items())
          + f" (sum {sum(once.values()) / 1e9:.3f} GB; report written in {report_s:.0f} s)")
    print(f"  total {gb:.3f} GB  [target <= {TARGET_RUN_GB} GB: {'met' if gb <= TARGET_RUN_GB else 'NOT met'}]  "
          f"(old layout's per-row tables: {old_mb * paper_logged / 1e3:.2f} GB)")
    shutil.rmtree(root)  # ~180 MB, the checkpoint most of it


if __name__ == "__main__":
    main()
