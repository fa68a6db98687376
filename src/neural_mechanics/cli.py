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
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import NMechError

app = typer.Typer(
    name="nmech",
    help=(
        "Neural mechanics for any PyTorch model: find its symmetries, check the constraints they put on "
        "gradients and Hessians, and track the conserved and broken charges during training next to exact "
        "and continuous-time predictions (Kunin et al., ICLR 2021)."
    ),
    no_args_is_help=True,
    add_completion=False,
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
    typer.Option("--loss", help="What the outputs feed: cross_entropy (softmax; gives translation symmetries) or "
                 "mse (no softmax)."),
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


def _load(model: str, input_shape: str | None, num_classes: int | None, batch: int, seed: int, eval_mode: bool):
    """Resolve a MODEL spec (with --input-shape applied) and build its seeded example batch."""
    from .experiments.specs import resolve_model

    resolved = resolve_model(model, num_classes=num_classes, input_shape=_parse_shape(input_shape))
    inputs = resolved.example_inputs(batch, seed=seed)
    net = resolved.model
    net.eval() if eval_mode else net.train()
    return resolved, net, inputs


@app.command()
def symmetries(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 4,
    loss: LossOpt = "cross_entropy",
    eval_mode: EvalOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the groups as a JSON list (the public contract).")
                       ] = False,
    explain: Annotated[str | None, typer.Option("--explain", help="Print why the members of group NAME are tied.")
                       ] = None,
    certify_groups: Annotated[bool, typer.Option("--certify/--no-certify",
                                                 help="Apply every group's action in float64 and report the "
                                                 "largest relative change of the loss and outputs.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for the example batch and certification.")] = 0,
) -> None:
    """Find every symmetry of MODEL from its computation graph: a table per layer and kind, or JSON."""
    from .symmetry.detect import find_symmetries

    resolved, net, inputs = _load(model, input_shape, num_classes, batch, seed, eval_mode)
    found = find_symmetries(net, inputs, loss=loss)
    if as_json:
        sys.stdout.write(found.to_json(indent=2) + "\n")
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
        from .symmetry.certify import certify

        report = certify(net, found, inputs, loss=loss, seed=seed)
        console.print(report.summary())
        if not report.ok:
            raise typer.Exit(1)


def _print_symmetry_table(found, title: str) -> None:
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
    for warning in found.meta.get("warnings", []):
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    if not len(found):
        console.print("No symmetry found: no softmax-fed linear layer, no normalisation, no positively "
                      "homogeneous neuron. See `meta` in --json output for the operations that blocked them.")


@app.command()
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
    import torch
    import torch.nn.functional as F

    from .constraints import check_constraints
    from .symmetry.detect import find_symmetries

    resolved, net, inputs = _load(model, input_shape, num_classes, batch, seed, eval_mode=False)
    found = find_symmetries(net, inputs)
    if not len(found):
        console.print("No symmetry found; nothing to check.")
        return
    failed = _uncertified(net, found, inputs, seed)
    if failed:
        err_console.print(f"[yellow]{len(failed)} group(s) did not certify and are not checked[/yellow]")
    certified = found.__class__([s for s in found if s.name not in failed], found.meta)
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, resolved.num_classes, (batch,), generator=gen)
    report = check_constraints(net, F.cross_entropy, (inputs, targets), certified, hessian=hessian, seed=seed)
    console.print(report.summary(grad_tol=grad_tol, hess_tol=hess_tol))
    if csv is not None:
        report.to_frame().to_csv(csv, index=False)
        console.print(f"per-group residuals written to {csv}")
    bad = report.violations(grad_tol=grad_tol, hess_tol=hess_tol)
    if len(bad):
        err_console.print(f"[red]{len(bad)} certified group(s) violate their constraint beyond tolerance[/red]")
        raise typer.Exit(1)


def _uncertified(net, found, inputs, seed: int) -> set[str]:
    """Names of groups whose action changes the loss. Certify a sample of each kind alone plus every kind's
    composition at once; only where a composition fails, certify that kind's groups one by one."""
    from .symmetry.certify import certify

    cert = certify(net, found, inputs, seed=seed)
    failed = {r.name for r in cert.results if not r.passed}
    kinds_of = {"all": ("translation", "scale", "rescale"), "scale+rescale": ("scale", "rescale")}
    bad_kinds = {k for r in cert.all_at_once if not r.passed for k in kinds_of.get(r.kind, (r.kind,))}
    for kind in sorted(bad_kinds):
        per_group = certify(net, found.filter(kind=kind), inputs, seed=seed, sample=None)
        failed |= {r.name for r in per_group.results if not r.passed}
    return failed


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="A YAML config file, or the name of a shipped config (see "
                                          "`nmech configs`), e.g. demo or vgg16-bn-tinyimagenet-sgd-wd5e-4.")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set optimizer.lr=0.05 "
                                                        "(repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in run_dir from its last checkpoint.")
                      ] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where the run is written (overrides the config).")
                       ] = None,
) -> None:
    """Train with the tracker attached: progress bar, periodic evaluation, checkpoints, `--resume`."""
    from .experiments.config import load_config
    from .experiments.train import run_training

    cfg = load_config(config, list(overrides or []))
    result = run_training(cfg, run_dir=run_dir, resume=resume, console=console)
    console.print(f"run written to [bold]{result.run_dir}[/bold]; `nmech report {result.run_dir}` renders it")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run directory written by `nmech train` or a Tracker.")],
    out: Annotated[Path | None, typer.Option("--out", help="The HTML file to write (default RUN/report.html).")] = None,
    compare: Annotated[list[str] | None, typer.Option(
        "--compare", help="Another run drawn beside this one in the charge figure, as LABEL=RUN_DIR (repeatable), "
        "e.g. --compare 'momentum 0.9=runs/mom'.")] = None,
) -> None:
    """Write one self-contained HTML report (figures, hyperparameters, symmetry summary, error table)."""
    from .plots.report import write_report

    others: dict[str, Path] = {}
    for item in compare or []:
        label, sep, path_text = item.rpartition("=")
        if not sep or not label or not path_text:
            raise NMechError(f"--compare {item!r} is not LABEL=RUN_DIR", "write e.g. --compare 'no momentum=runs/sgd'")
        others[label] = Path(path_text)
    path = write_report(run, out, compare=others or None)
    console.print(f"report written to [bold]{path}[/bold]")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Directory for the demo run and its report.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: the demo config's).")] = None,
) -> None:
    """The embedded default: a small VGG-style BatchNorm net on scikit-learn's digits, end to end."""
    from .experiments.demo import run_demo

    run_demo(out, steps=steps, console=console)


@app.command()
def presets() -> None:
    """List the model presets a MODEL argument can name."""
    from .experiments.models import list_presets

    table = Table(title="model presets (also: torchvision:NAME, package.module:factory)")
    for col in ("name", "input", "dataset", "description"):
        table.add_column(col)
    for p in list_presets():
        table.add_row(p.name, "x".join(map(str, p.input_shape)), p.dataset, p.description)
    console.print(table)


@app.command()
def configs() -> None:
    """List the shipped training configs (`nmech train NAME` runs one)."""
    from .experiments.config import list_configs, load_config

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
