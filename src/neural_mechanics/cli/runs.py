"""`nmech train`, `report`, `demo`, `presets` and `configs`: config-driven runs with the tracker and what they
write."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import NMechError
from ..experiments.config import list_configs, load_config
from ..experiments.demo import run_demo
from ..experiments.models import list_presets
from ..experiments.train import run_training
from ..plots.report import missing_predictions, write_report
from .app import _Command, app, console


@app.command(cls=_Command)
def train(
    config: Annotated[str, typer.Argument(help="A YAML config file, or the name of a shipped config (see "
                                          "`nmech configs`), e.g. demo or vgg16-bn-tinyimagenet-sgd-wd5e-4.")],
    overrides: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                        help="Override a config key: --set optimizer.lr=0.05 "
                                                        "(repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in run_dir from its last checkpoint.")
                      ] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where the run is written (overrides the config).")
                       ] = None,
) -> None:
    """Train with the tracker attached: progress bar, periodic evaluation, checkpoints, `--resume`.

    The config names the model (any MODEL form), the data (`dataset.name`: digits, cifar10/100, tinyimagenet,
    synthetic, imagefolder with dataset.root, tokens, or your package.module:factory) and the loss (`loss`:
    cross_entropy, next_token or mse).
    """
    cfg = load_config(config, list(overrides or []))
    result = run_training(cfg, run_dir=run_dir, resume=resume, console=console)
    console.print(f"run written to [bold]{result.run_dir}[/bold]; `nmech report {result.run_dir}` renders it")


@app.command(cls=_Command)
def report(
    run: Annotated[Path, typer.Argument(help="A run directory written by `nmech train` or a Tracker.")],
    out: Annotated[Path | None, typer.Option("--out", help="The HTML file to write (default RUN/report.html).")] = None,
    compare: Annotated[list[str] | None, typer.Option(
        "--compare", metavar="LABEL=RUN_DIR", help="Another run drawn beside this one in the charge figure, as "
        "LABEL=RUN_DIR (repeatable), e.g. --compare 'momentum 0.9=runs/mom'.")] = None,
) -> None:
    """Write one self-contained HTML report (figures, hyperparameters, symmetry summary, error table)."""
    others: dict[str, Path] = {}
    for item in compare or []:
        label, sep, path_text = item.rpartition("=")
        if not sep or not label or not path_text:
            raise NMechError(f"--compare {item!r} is not LABEL=RUN_DIR", "write e.g. --compare 'no momentum=runs/sgd'")
        others[label] = Path(path_text)
    path = write_report(run, out, compare=others or None)
    reason = missing_predictions(run)
    if reason:
        console.print(f"[yellow]no predictions for this run:[/yellow] {reason}", highlight=False)
    console.print(f"report written to [bold]{path}[/bold]")


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option("--out", help="Directory for the demo run and its report.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: the demo config's).")] = None,
    optimizer: Annotated[str, typer.Option(
        "--optimizer", help="sgd: the paper's setting (SGD + momentum, config demo); adamw: AdamW on digits with 30% "
                            "randomised labels (config digits-adamw-noisy, 3000 steps), its rotational "
                            "equilibrium in the report.")] = "sgd",
) -> None:
    """The embedded default: a small VGG-style BatchNorm net on scikit-learn's digits, end to end."""
    run_demo(out, steps=steps, optimizer=optimizer, console=console)


@app.command(cls=_Command)
def presets() -> None:
    """List the model presets a MODEL argument can name."""
    table = Table(title="model presets (also: torchvision:NAME, package.module:factory)")
    for col in ("name", "input", "dataset", "description"):
        table.add_column(col)
    for p in list_presets():
        table.add_row(p.name, "x".join(map(str, p.input_shape)), p.dataset, p.description)
    console.print(table)


@app.command(cls=_Command)
def configs() -> None:
    """List the shipped training configs (`nmech train NAME` runs one)."""
    table = Table(title="shipped configs (nmech train NAME [--set key=value ...])")
    table.add_column("name")
    table.add_column("description")
    for name in list_configs():
        table.add_row(name, load_config(name).description)
    console.print(table)
