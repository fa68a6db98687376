"""`nmech`: the command line. Thin by design: every command is one library call plus printing.

Commands: `symmetries` (find, certify, print or export the groups of a model), `check` (gradient and
Hessian constraints against random baselines), `train` (a config-driven run with the tracker),
`report` (one HTML file from a run directory), `demo` (the embedded default, end to end) and
`presets` (what a MODEL argument can name). User errors (`NMechError`) print what happened and what
to do, and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from .errors import NMechError
from .experiments.checks import check_model, load_example
from .experiments.config import list_configs, load_config
from .experiments.demo import run_demo
from .experiments.models import list_presets
from .experiments.train import run_training
from .plots.report import write_report
from .symmetry.certify import certify
from .symmetry.coverage import coverage_lines, empty_message
from .symmetry.detect import find_symmetries


def _no_flag_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows none (typer would print `<bool>` after every flag and --help)."""
    for p in params:
        if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_metavar(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_metavar(super().get_params(ctx))


app = typer.Typer(
    name="nmech",
    help=(
        "Neural mechanics for any PyTorch model: find its symmetries, check the constraints they put on "
        "gradients and Hessians, and track the conserved and broken charges during training next to exact "
        "and continuous-time predictions (Kunin et al., ICLR 2021)."
    ),
    no_args_is_help=True,
    add_completion=False,
    cls=_Group,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

MODEL_HELP = (
    "The model: a preset name (see `nmech presets`), `torchvision:NAME` (e.g. torchvision:resnet18, random "
    "weights) or `package.module:factory` (a callable returning an nn.Module)."
)
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
InputShapeOpt = Annotated[
    str | None,
    typer.Option("--input-shape", help="Shape of ONE input without the batch dim, e.g. 3,64,64 (default: the "
                 "model's own default)."),
]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Number of classes for the classifier.")]
BatchOpt = Annotated[int, typer.Option("--batch", min=2, help="Example batch size (>= 2 for train-mode BatchNorm).")]
LossOpt = Annotated[
    str,
    typer.Option("--loss", help="What the outputs feed: cross_entropy (softmax over the class axis: dim 1, or the "
                 "last axis of token logits (B, T, V); gives translation symmetries), next_token / masked_token "
                 "(language-model losses over token logits), or mse (no softmax)."),
]
EvalOpt = Annotated[bool, typer.Option("--eval", help="Analyse the model in eval mode (BatchNorm then uses running "
                                       "statistics and has no scale symmetry).")]


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise NMechError(f"--input-shape {text!r} is not a list of integers",
                         "give the shape of one input without the batch dim, e.g. --input-shape 3,64,64") from None
    if not shape or any(s <= 0 for s in shape):
        raise NMechError(f"--input-shape {text!r} must be positive integers", "e.g. --input-shape 3,64,64")
    return shape


@app.command(cls=_Command)
def symmetries(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 4,
    loss: LossOpt = "cross_entropy",
    eval_mode: EvalOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the groups as a JSON list (the public contract).")
                       ] = False,
    json_full: Annotated[bool, typer.Option("--json-full", help="Print {\"symmetries\": [...], \"meta\": {...}}: the "
                                            "groups and the detection facts, coverage included (the parameter "
                                            "fraction in groups, the ops that blocked the rest).")] = False,
    explain: Annotated[str | None, typer.Option("--explain", help="Print why the members of group NAME are tied.")
                       ] = None,
    certify_groups: Annotated[bool, typer.Option("--certify/--no-certify",
                                                 help="Apply every group's action in float64 and report the "
                                                 "largest relative change of the loss and outputs.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for the example batch and certification.")] = 0,
) -> None:
    """Find every symmetry of MODEL from its computation graph: a table per layer and kind with the coverage (the
    fraction of parameters in groups, the ops that blocked the rest), then certification; or JSON."""
    resolved, inputs = load_example(model, input_shape=_parse_shape(input_shape), num_classes=num_classes,
                                    batch=batch, seed=seed, eval_mode=eval_mode)
    net = resolved.model
    found = find_symmetries(net, inputs, loss=loss)
    if as_json or json_full:
        sys.stdout.write(found.to_json(indent=2, with_meta=json_full) + "\n")
        return
    if explain is not None:
        if explain not in found:
            close = [s.name for s in found if explain in s.name][:10]
            raise NMechError(f"no symmetry named {explain!r} in {model}",
                             "names are listed by `nmech symmetries MODEL --json`"
                             + (f"; similar: {', '.join(close)}" if close else ""))
        console.print(found[explain].details(), markup=False, highlight=False)
        return
    _print_symmetry_table(found, title=f"{model} ({resolved.description}), input {tuple(inputs.shape)}")
    if certify_groups and len(found):
        report = certify(net, found, inputs, loss=loss, seed=seed)
        console.print(report.summary())
        if not report.ok:
            raise typer.Exit(1)


def _print_symmetry_table(found: Any, title: str) -> None:
    table = Table(title=title, show_lines=False)
    table.add_column("layer")
    for kind in ("translation", "scale", "rescale"):
        table.add_column(kind, justify="right")
    by_layer = found.counts_by_layer()
    for layer in found.layers():
        table.add_row(layer, *(str(by_layer.get((layer, k), "")) for k in ("translation", "scale", "rescale")))
    totals = found.counts()
    table.add_row("[bold]total[/bold]", *(f"[bold]{totals[k]}[/bold]" for k in ("translation", "scale", "rescale")))
    console.print(table)
    if found.meta.get("loss_detail"):
        console.print(f"loss: {found.meta['loss_detail']}", markup=False, highlight=False)
    for warning in found.meta.get("warnings", []):
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    if not len(found):
        console.print(empty_message(found.meta), markup=False, highlight=False)
    for line in coverage_lines(found.meta):
        console.print(line, markup=False, highlight=False)


@app.command(cls=_Command)
def check(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 8,
    hessian: Annotated[bool, typer.Option("--hessian/--no-hessian", help="Also check the Hessian constraints.")] = True,
    grad_tol: Annotated[float, typer.Option(help="Tolerance on the relative gradient-constraint residual.")] = 1e-6,
    hess_tol: Annotated[float, typer.Option(help="Tolerance on the relative Hessian-constraint residual.")] = 1e-4,
    csv: Annotated[Path | None, typer.Option(help="Also write the per-group residuals to this CSV file.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the example batch, targets and probes.")] = 0,
) -> None:
    """Check the gradient and Hessian constraints of every group, in float64, against random baselines.

    Exits with status 1 when a certified group violates its constraint beyond tolerance.
    """
    resolved, inputs = load_example(model, input_shape=_parse_shape(input_shape), num_classes=num_classes,
                                    batch=batch, seed=seed)
    result = check_model(resolved, inputs, hessian=hessian, seed=seed)
    if result.report is None:
        console.print(empty_message(result.found.meta) + " Nothing to check.", markup=False, highlight=False)
        for line in coverage_lines(result.found.meta):
            console.print(line, markup=False, highlight=False)
        return
    if result.uncertified:
        err_console.print(f"[yellow]{len(result.uncertified)} group(s) did not certify and are not checked[/yellow]")
    report = result.report
    console.print(report.summary(grad_tol=grad_tol, hess_tol=hess_tol))
    if csv is not None:
        report.to_frame().to_csv(csv, index=False)
        console.print(f"per-group residuals written to {csv}")
    bad = report.violations(grad_tol=grad_tol, hess_tol=hess_tol)
    if len(bad):
        err_console.print(f"[red]{len(bad)} certified group(s) violate their constraint beyond tolerance[/red]")
        raise typer.Exit(1)


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
    """Train with the tracker attached: progress bar, periodic evaluation, checkpoints, `--resume`."""
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
    console.print(f"report written to [bold]{path}[/bold]")


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option("--out", help="Directory for the demo run and its report.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: the demo config's).")] = None,
) -> None:
    """The embedded default: a small VGG-style BatchNorm net on scikit-learn's digits, end to end."""
    run_demo(out, steps=steps, console=console)


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


def main() -> None:
    """Console-script entry point: user errors become a message and exit status 2."""
    try:
        app()
    except NMechError as exc:
        err_console.print(f"[red]error:[/red] {exc.what}")
        if exc.fix:
            err_console.print(f"[cyan]what to do:[/cyan] {exc.fix}")
        sys.exit(2)


if __name__ == "__main__":
    main()
