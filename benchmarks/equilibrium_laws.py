"""The equilibrium laws of docs/theory.md section 6.3 against long runs: a noise-gradient simulation and digits.

    .venv/bin/python benchmarks/equilibrium_laws.py --part sim       # synthetic scale-invariant objective
    .venv/bin/python benchmarks/equilibrium_laws.py --part digits    # 3000-step runs on digits, every optimizer
    .venv/bin/python benchmarks/equilibrium_laws.py --part digits --only adamw --labels clean noisy

`sim`: tests/scale_invariant_sim.py's objective (exactly scale-invariant groups, gradients of pure noise), each
optimizer run long with the Tracker; over the second half of the steps it prints the RMS measured angle against
`angular_update_eq`, and the mean |theta_A|^2 against `predicted_equilibrium` (the closed form) and against its
instantaneous form predicted_equilibrium * update_ratio (the measured |u|^2).

`digits`: `nmech train` runs of the digits networks (digits-vgg-bn; mlp-bn-matrices for Muon, which trains matrices
only) with 30 % randomised training labels ("noisy", the regime of the theory) or clean labels, 3000 steps with
eta lambda = 1e-3 (relaxation time 1000 steps). Per run: the median over scale groups of measured / predicted angle
over the last 30 % of steps (`tracking.metrics.angular_update_ratio`, the issue's figure of merit), how far the
norms were from equilibrium (median |theta|^2 / predicted_equilibrium, and against the instantaneous form), the
median update_ratio (|u|^2 over its noise-dominated value: the regime check) and the run length in relaxation times.
Single-threaded (torch.set_num_threads(1)); a 3000-step run takes a few minutes on one core.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neural_mechanics.experiments.config import load_config
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.metrics import angular_update_ratio
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.tracker import Tracker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from scale_invariant_sim import NoiseSphere, run_noise

# ---- the synthetic objective -------------------------------------------------------------------------------------


def _lion(p: Any, **kw: Any) -> torch.optim.Optimizer:
    from lion_pytorch import Lion  # optional extra

    return Lion(p, **kw)


SIM: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], list[tuple[int, int]], str]] = {
    "adamw C=100": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), [(64, 100)], "rows"),
    "adamw C=10": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), [(64, 10)], "rows"),
    "adamw beta1=0.5": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, betas=(0.5, 0.999)),
                        [(64, 100)], "rows"),
    "lion": (lambda p: _lion(p, lr=1e-3, weight_decay=1.0), [(64, 100)], "rows"),
    "muon square, rows": (lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=0.1), [(64, 64)], "rows"),
    "muon square, matrix": (lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=0.1), [(64, 64)], "matrix"),
    "muon wide, rows": (lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=0.1), [(32, 128)], "rows"),
    "muon tall, rows": (lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=0.1), [(128, 32)], "rows"),
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2), [(64, 100)], "rows"),
    "sgd momentum 0.9": (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1), [(64, 100)], "rows"),
}


def simulate(steps: int, dtype: torch.dtype) -> pd.DataFrame:
    rows = []
    for name, (make, shapes, groups) in SIM.items():
        t0 = time.perf_counter()
        model = NoiseSphere(shapes, groups).to(dtype)
        opt = make(model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            with Tracker(model, opt, model.symmetries(), tmp, log_every=10):
                run_noise(model, opt, steps)
            df = open_run(tmp).frame()
        late = df[(df["step"] >= steps // 2) & (df["step"] < steps)]
        rms = math.sqrt((late["angular_update"] ** 2).mean())
        pred = math.sqrt((late["angular_update_eq"] ** 2).mean())
        s, seq = late["measured"].mean(), late["predicted_equilibrium"].mean()
        inst = (late["predicted_equilibrium"] * late["update_ratio"]).mean()
        rows.append({"run": name, "angle": rms, "angle_eq": pred, "angle ratio": rms / pred,
                     "S / S_eq": s / seq, "S / S_eq(measured U)": s / inst if np.isfinite(inst) else math.nan,
                     "update_ratio": late["update_ratio"].median(), "seconds": time.perf_counter() - t0})
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1, float_format="%.4f"),
              flush=True)
    return pd.DataFrame(rows)


# ---- digits ---------------------------------------------------------------------------------------------------
DIGITS: dict[str, list[str]] = {
    "adamw": ["optimizer.name=adamw", "optimizer.lr=1e-2", "optimizer.weight_decay=0.1"],
    "adam_l2": ["optimizer.name=adam", "optimizer.lr=1e-2", "optimizer.weight_decay=1e-3"],
    "rmsprop": ["optimizer.name=rmsprop", "optimizer.lr=1e-3", "optimizer.weight_decay=1e-3", "optimizer.eps=1e-8"],
    "lion": ["optimizer.name=lion", "optimizer.lr=1e-3", "optimizer.betas=[0.9, 0.99]", "optimizer.weight_decay=1.0"],
    "muon": ["model=mlp-bn-matrices", "optimizer.name=muon", "optimizer.lr=1e-2", "optimizer.momentum=0.95",
             "optimizer.nesterov=true", "optimizer.weight_decay=0.1", "optimizer.betas=[0.9, 0.999]"],
    "sgd": ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9", "optimizer.weight_decay=1e-3"],
}


def digits_summary(run_dir: Path) -> dict[str, Any]:
    """The figures of merit of one run (see the module docstring)."""
    run = open_run(run_dir)
    df = run.frame()
    scale = df[(df["kind"] == "scale") & df["angular_update"].notna()]
    hi = int(scale["step"].max()) if len(scale) else 0
    late = scale[scale["step"] >= 0.7 * hi]
    ratio = angular_update_ratio(df)
    relax = late["relaxation_time"].median()
    out: dict[str, Any] = {
        "angle ratio (median)": ratio["ratio"].median() if len(ratio) else math.nan,
        "angle ratio q10-q90": (f"{ratio['ratio'].quantile(0.1):.2f}-{ratio['ratio'].quantile(0.9):.2f}"
                                if len(ratio) else "-"),
        "angle (median, rad)": late["angular_update"].median(),
        "angle_eq": late["angular_update_eq"].median(),
        "S / S_eq": (late["measured"] / late["predicted_equilibrium"]).median(),
        "S / S_eq(measured U)": (late["measured"] / (late["predicted_equilibrium"] * late["update_ratio"])).median(),
        "update_ratio": late["update_ratio"].median(),
        "steps / relaxation": hi / relax if np.isfinite(relax) else math.nan,
        "equilibrium": run.manifest.get("equilibrium", {}).get("reason", ""),
    }
    metrics = run.metrics()
    train_loss = metrics[(metrics["name"] == "loss") & (metrics["split"] == "train")]
    out["final train loss"] = float(train_loss["value"].tail(20).mean()) if len(train_loss) else math.nan
    return out


def digits(names: list[str], labels: list[str], steps: int, out_dir: Path) -> pd.DataFrame:
    rows = []
    for name in names:
        for label in labels:
            t0 = time.perf_counter()
            run_dir = out_dir / f"{name}-{label}"
            overrides = [*DIGITS[name], f"steps={steps}", "eval_every=0", f"run_dir={run_dir}",
                         f"dataset.label_noise={0.3 if label == 'noisy' else 0.0}", f"name={name}-{label}"]
            cfg = load_config("digits-adamw-noisy", overrides)
            run_training(cfg, run_dir=run_dir)
            row = {"optimizer": name, "labels": label, **digits_summary(run_dir),
                   "minutes": (time.perf_counter() - t0) / 60}
            rows.append(row)
            print(pd.DataFrame([row]).drop(columns="equilibrium").to_string(index=False, float_format="%.3f"),
                  flush=True)
            if not np.isfinite(row["angle ratio (median)"]):
                print(f"  no prediction: {row['equilibrium']}", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["sim", "digits"], required=True)
    ap.add_argument("--steps", type=int, default=None, help="sim: 14000; digits: 3000")
    ap.add_argument("--only", nargs="*", default=None, help="digits: optimizers to run (default: all)")
    ap.add_argument("--labels", nargs="*", default=["noisy", "clean"], choices=["noisy", "clean"])
    ap.add_argument("--out", type=Path, default=None, help="digits: keep the run directories here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part == "sim":
        simulate(args.steps or 14000, torch.float64)
        return
    names = args.only or list(DIGITS)
    with tempfile.TemporaryDirectory() as tmp:
        table = digits(names, args.labels, args.steps or 3000, args.out or Path(tmp))
    print()
    print(table.drop(columns="equilibrium").to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
