"""Bytes on disk per logged step of the run store, for the paper's VGG-16-BN (11,521 groups): target <= 0.3 MB.

    .venv/bin/python benchmarks/store_size.py [--steps 20] [--batch 8] [--flush 20] [--threads 1]

Realistic values: the paper's model (Tiny ImageNet variant, 200 classes, 64x64, train mode) is trained for `--steps`
steps (SGD, heavy-ball momentum 0.9, lr 0.1, weight decay 1e-4: the paper's momentum run, random data standing in
for Tiny ImageNet) with a Tracker logging every step into a run directory, `--flush` logged steps per part (a paper
run logs every 10 steps and flushes every 200: 20 logged steps per part). The same rows, recorded by a second sink,
are written in the previous layout (schema version 1: the long form, strings and twelve float64 columns per row,
pyarrow's default options) with the same parts, so both formats are measured on identical values in one run.

Printed: MB per logged step of each format (the per-row tables; groups.parquet and manifest.json are written once
per run and reported apart), their ratio, the verdict against the target, what a full paper run (39k steps, log
every 10) would take, and the stored bytes per row of every column of the charges table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from neural_mechanics.experiments.models import vgg16
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking.sinks import Sink
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker

TARGET_MB = 0.3
PAPER_LOGGED_STEPS = 39_000 // 10
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
    t0 = time.perf_counter()
    with Tracker(model, opt, syms, root / "new", log_every=1, flush_every=args.flush, sink=rec):
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    train_s = time.perf_counter() - t0
    write_v1(root / "old", rec, args.flush)
    logged = len(rec.groups)
    new = table_bytes(root / "new", ("charges", "steps", "layers"))
    old = table_bytes(root / "old", ("groups", "layers"))
    new_mb, old_mb = sum(new.values()) / logged / 1e6, sum(old.values()) / logged / 1e6
    frame = open_run(root / "new").frame()
    assert len(frame) == logged * len(syms), "the store lost rows"
    once = {"groups.parquet": (root / "new" / "groups.parquet").stat().st_size,
            "manifest.json": (root / "new" / "manifest.json").stat().st_size}
    c = syms.counts()
    print(f"VGG-16-BN (Tiny ImageNet variant): {len(syms)} groups (translation {c['translation']}, scale {c['scale']}, "
          f"rescale {c['rescale']}); {logged} logged steps of training (batch {args.batch}, {train_s:.0f} s), "
          f"{args.flush} logged steps per part")
    print(f"  new layout (schema 2): {new_mb:.3f} MB per logged step  "
          f"[target <= {TARGET_MB} MB: {'met' if new_mb <= TARGET_MB else 'NOT met'}]  "
          + ", ".join(f"{t} {b / logged / 1e6:.4f}" for t, b in new.items()))
    print(f"  old layout (schema 1): {old_mb:.3f} MB per logged step  "
          + ", ".join(f"{t} {b / logged / 1e6:.4f}" for t, b in old.items()))
    print(f"  old / new: x{old_mb / new_mb:.2f}; a full paper run ({PAPER_LOGGED_STEPS} logged steps): "
          f"{new_mb * PAPER_LOGGED_STEPS / 1e3:.2f} GB (old {old_mb * PAPER_LOGGED_STEPS / 1e3:.2f} GB)")
    print("  written once per run: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in once.items()))
    rows = logged * len(syms)
    per_col = column_bytes(root / "new", "charges")
    print("  charges bytes per row: " + ", ".join(f"{k} {v / rows:.2f}" for k, v in per_col.items())
          + f" (total {sum(per_col.values()) / rows:.2f})")


if __name__ == "__main__":
    main()
