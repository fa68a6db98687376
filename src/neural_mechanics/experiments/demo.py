"""`nmech demo`: the whole pipeline on data that ships with scikit-learn, in a few minutes on a laptop.

1. find the symmetries of a small VGG-style BatchNorm network on 8x8 digits and certify them;
2. check the gradient and Hessian constraints against random baselines (float64);
3. train it with SGD + momentum + weight decay, the tracker on, logging every charge next to its
   exact and paper predictions;
4. write the HTML report, and print the largest relative error of the exact prediction.

`optimizer="adamw"` runs the same stages on the shipped config digits-adamw-noisy instead (AdamW, 30 % randomised
training labels, 3000 steps): stage 4 then prints the error of the exact step identity (docs/theory.md section 6.1)
and the measured / predicted equilibrium angle (section 6.3, the report's equilibrium panel).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from neural_mechanics.constraints import check_constraints
from neural_mechanics.errors import ConfigError, RunStoreError
from neural_mechanics.experiments.config import load_config
from neural_mechanics.experiments.datasets import load_dataset, make_loader
from neural_mechanics.experiments.specs import resolve_model
from neural_mechanics.experiments.train import run_training
from neural_mechanics.plots.report import write_report
from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking.metrics import angular_update_ratio
from neural_mechanics.tracking.store import open_run

EXACT_TARGET = 1e-4
DEMO_CONFIGS = {"sgd": "demo", "adamw": "digits-adamw-noisy"}
"""The demo's optimizer -> the shipped config it trains."""


def _clear_previous_demo(run_dir: Path) -> None:
    """Remove an earlier demo run in `run_dir` (only if its manifest says it is a demo run, of either optimizer)."""
    manifest = run_dir / "manifest.json"
    if not run_dir.exists():
        return
    name = None
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("config", {}).get("name")
        except (OSError, ValueError):
            name = None
    if name not in DEMO_CONFIGS.values() and any(run_dir.iterdir()):
        raise RunStoreError(f"{run_dir} exists and is not a demo run", "pass --out to a new or demo directory")
    shutil.rmtree(run_dir)


def run_demo(out: Path, *, steps: int | None = None, optimizer: str = "sgd", console: Any = None) -> dict[str, Any]:
    """Run the four stages; return the numbers printed (for tests). `optimizer`: a key of DEMO_CONFIGS."""
    console = console or Console()
    if optimizer not in DEMO_CONFIGS:
        raise ConfigError(f"demo: unknown optimizer {optimizer!r}", f"use one of {', '.join(DEMO_CONFIGS)}")
    overrides = [f"steps={steps}"] if steps is not None else []
    cfg = load_config(DEMO_CONFIGS[optimizer], overrides)
    run_dir = Path(out) / "run"
    _clear_previous_demo(run_dir)

    console.rule("[bold]1. Symmetries")
    data = load_dataset(cfg.dataset.name, split="train", seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the network stage 3 trains from (run_training seeds the same way)
    resolved = resolve_model(cfg.model, num_classes=data.num_classes)
    model = resolved.model.train()
    x, y = next(iter(make_loader(data, 32, seed=cfg.seed)))
    found = find_symmetries(model, x)
    console.print(f"{cfg.model}: {resolved.description}")
    console.print(found.details())
    cert = certify(model, found, x, seed=cfg.seed)
    console.print(cert.summary())

    console.rule("[bold]2. Geometry (gradient and Hessian constraints, float64)")
    geo = check_constraints(model, F.cross_entropy, (x, y), found, hessian=True, seed=cfg.seed)
    console.print(geo.summary())

    console.rule("[bold]3. Training with the tracker")
    console.print(f"{cfg.description}")
    result = run_training(cfg, run_dir=run_dir, console=console)
    console.print(f"final: {', '.join(f'{k} {v:.4f}' for k, v in result.metrics.items())}")

    console.rule("[bold]4. Report")
    report = write_report(run_dir)
    exact = result.max_rel_error.get("exact", float("nan"))
    breaking = result.max_rel_error.get("breaking", float("nan"))
    paper = result.max_rel_error.get("paper", float("nan"))
    console.print(f"groups tracked: {result.n_groups}")
    if optimizer != "sgd":
        ratio = angular_update_ratio(open_run(run_dir).frame())["ratio"].median()
        console.print(f"largest relative error of the exact step identity over all groups and steps: {breaking:.2e}; "
                      f"equilibrium angle per step, measured / predicted (median over scale groups, last 30 % of "
                      f"steps): {ratio:.3f}")
        console.print(f"report: [bold]{report.resolve()}[/bold]")
        torch.set_grad_enabled(True)
        return {"report": report, "run_dir": run_dir, "max_rel_error": result.max_rel_error,
                "certified": cert.ok, "counts": found.counts(), "angle_ratio": float(ratio)}
    console.print(f"largest relative error over all groups and steps: exact (symmetry only) {exact:.2e} "
                  f"(target <= {EXACT_TARGET:g}: {'ok' if exact <= EXACT_TARGET else 'MISSED'}), "
                  f"exact with measured breaking {breaking:.2e}, paper (continuous) {paper:.2e}")
    console.print(f"report: [bold]{report.resolve()}[/bold]")
    torch.set_grad_enabled(True)
    return {"report": report, "run_dir": run_dir, "max_rel_error": result.max_rel_error,
            "certified": cert.ok, "counts": found.counts()}
