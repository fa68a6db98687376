"""`nmech symmetries` (find, certify, print or export the groups of a model) and `nmech check` (the gradient and
Hessian constraints they impose, against random baselines)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import NMechError
from ..experiments.checks import check_model
from ..symmetry.certify import certify
from ..symmetry.coverage import coverage_lines, empty_message
from ..symmetry.detect import find_symmetries
from .app import _Command, app, console, err_console
from .options import (
    BatchOpt,
    ClassDimOpt,
    EvalOpt,
    InputDtypeOpt,
    InputShapeOpt,
    LossOpt,
    ModelArg,
    ModelSetOpt,
    NumClassesOpt,
    VocabOpt,
    example,
    objective_for,
)


@app.command(cls=_Command)
def symmetries(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    vocab: VocabOpt = None,
    num_classes: NumClassesOpt = None,
    overrides: ModelSetOpt = None,
    batch: BatchOpt = 4,
    loss: LossOpt = None,
    class_dim: ClassDimOpt = None,
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
    objective = objective_for(loss, class_dim)
    resolved, inputs = example(model, input_shape, input_dtype, vocab, num_classes, batch, seed, eval_mode, overrides)
    net = resolved.model
    found = find_symmetries(net, inputs, loss=objective.spec)
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
        report = certify(net, found, inputs, loss=objective.spec, seed=seed)
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
    input_dtype: InputDtypeOpt = None,
    vocab: VocabOpt = None,
    num_classes: NumClassesOpt = None,
    overrides: ModelSetOpt = None,
    batch: BatchOpt = 8,
    loss: LossOpt = None,
    class_dim: ClassDimOpt = None,
    hessian: Annotated[bool, typer.Option("--hessian/--no-hessian", help="Also check the Hessian constraints.")] = True,
    grad_tol: Annotated[float, typer.Option(help="Tolerance on the relative gradient-constraint residual.")] = 1e-6,
    hess_tol: Annotated[float, typer.Option(help="Tolerance on the relative Hessian-constraint residual.")] = 1e-4,
    csv: Annotated[Path | None, typer.Option(help="Also write the per-group residuals to this CSV file.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the example batch, targets and probes.")] = 0,
) -> None:
    """Check the gradient and Hessian constraints of every group, in float64, against random baselines.

    The loss is evaluated against seeded random targets shaped after the model's output (a class per example, per
    pixel or per token; real values for mse). Exits with status 1 when a certified group violates its constraint
    beyond tolerance, and 2 when the model or the options are wrong.
    """
    objective = objective_for(loss, class_dim)
    resolved, inputs = example(model, input_shape, input_dtype, vocab, num_classes, batch, seed, overrides=overrides)
    result = check_model(resolved, inputs, hessian=hessian, seed=seed, objective=objective)
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
