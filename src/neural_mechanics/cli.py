"""`nmech`: the command line. Thin by design: every command is one library call plus printing.

Commands: `symmetries` (find, certify, print or export the groups of a model), `check` (gradient and
Hessian constraints against random baselines), `train` (a config-driven run with the tracker, on built-in data or
yours: image folders, dataset factories, token files),
`report` (one HTML file from a run directory), `demo` (the embedded default, end to end) and
`presets` (what a MODEL argument can name); `groups`, `balance`, `equalize`, `distance` and
`completeness` put the certified symmetries to work (neural_mechanics.uses). User errors (`NMechError`)
print what happened and what to do, and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from .errors import NMechError
from .experiments.checks import check_model, load_example, uncertified_groups
from .experiments.config import list_configs, load_config
from .experiments.demo import run_demo
from .experiments.hub_models import parse_overrides
from .experiments.models import list_presets
from .experiments.objectives import build_objective
from .experiments.specs import parse_input_dtype
from .experiments.train import run_training
from .plots.report import missing_predictions, write_report
from .symmetry.certify import certify
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
    "weights), `timm:NAME` (timm.create_model(NAME, pretrained=False)), `hf:CLASS` (a transformers model class from "
    "its default config, e.g. hf:GPT2LMHeadModel; shrink it with --set) or `package.module:factory` (a callable "
    "returning an nn.Module; the module is imported from the current directory first, as `python -m` does)."
)
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
InputShapeOpt = Annotated[
    str | None,
    typer.Option("--input-shape", help="Shape of ONE input without the batch dim, e.g. 3,64,64, or 16 for 16 token "
                 "ids (default: the model's own default)."),
]
InputDtypeOpt = Annotated[
    str | None,
    typer.Option("--input-dtype", help="What one input holds: float32 (default), float64, ..., or long for token "
                 "ids (the default when the model's first layer is an nn.Embedding)."),
]
VocabOpt = Annotated[
    int | None,
    typer.Option("--vocab", help="Token ids are drawn below this (implies --input-dtype long; default: the rows of "
                 "the model's first nn.Embedding)."),
]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Number of classes for the classifier.")]
ModelSetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="timm:/hf: models: a constructor keyword (timm) or config key "
                 "(hf), typed int/float/bool, repeatable: --set num_hidden_layers=2 --set hidden_size=64. hf: "
                 "language models read --input-shape tokens per example (default 16) below the config's vocab_size."),
]
BatchOpt = Annotated[int, typer.Option("--batch", min=2, help="Example batch size (>= 2 for train-mode BatchNorm).")]
LossOpt = Annotated[
    str,
    typer.Option("--loss", help="What the outputs feed: cross_entropy (softmax over --class-dim; per-pixel "
                 "logits (N, C, H, W) too), next_token (token logits (B, T, V): softmax over the vocabulary) or mse "
                 "(no softmax, so no translation symmetry)."),
]
ClassDimOpt = Annotated[
    int | None,
    typer.Option("--class-dim", help="cross_entropy: the axis of the outputs that holds the classes (default 1)."),
]
EvalOpt = Annotated[bool, typer.Option("--eval", help="Analyse the model in eval mode (BatchNorm then uses running "
                                       "statistics and has no scale symmetry).")]


def _example(model: str, input_shape: str | None, input_dtype: str | None, vocab: int | None, num_classes: int | None,
             batch: int, seed: int, eval_mode: bool = False, overrides: list[str] | None = None) -> tuple[Any, Any]:
    """The resolved model and its example batch, from the shared MODEL options."""
    return load_example(model, input_shape=_parse_shape(input_shape), num_classes=num_classes, batch=batch, seed=seed,
                        eval_mode=eval_mode, input_dtype=parse_input_dtype(input_dtype) if input_dtype else None,
                        vocab_size=vocab, overrides=parse_overrides(overrides))


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
    input_dtype: InputDtypeOpt = None,
    vocab: VocabOpt = None,
    num_classes: NumClassesOpt = None,
    overrides: ModelSetOpt = None,
    batch: BatchOpt = 4,
    loss: LossOpt = "cross_entropy",
    class_dim: ClassDimOpt = None,
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
    objective = build_objective(loss, class_dim)
    resolved, inputs = _example(model, input_shape, input_dtype, vocab, num_classes, batch, seed, eval_mode, overrides)
    net = resolved.model
    found = find_symmetries(net, inputs, loss=objective.spec)
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
    for warning in found.meta.get("warnings", []):
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    if not len(found):
        console.print("No symmetry found: no softmax-fed linear layer, no normalisation, no positively "
                      "homogeneous neuron. See `meta` in --json output for the operations that blocked them.")


@app.command(cls=_Command)
def check(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    vocab: VocabOpt = None,
    num_classes: NumClassesOpt = None,
    overrides: ModelSetOpt = None,
    batch: BatchOpt = 8,
    loss: LossOpt = "cross_entropy",
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
    objective = build_objective(loss, class_dim)
    resolved, inputs = _example(model, input_shape, input_dtype, vocab, num_classes, batch, seed, overrides=overrides)
    result = check_model(resolved, inputs, hessian=hessian, seed=seed, objective=objective)
    if result.report is None:
        console.print("No symmetry found; nothing to check.")
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


# ---------------------------------------------------------------------------------------------------
# Putting the symmetries to work (neural_mechanics.uses): groups, balance, equalize, distance, completeness.
# Each command resolves the model, finds and certifies its groups (uncertified ones are dropped with a
# warning), makes one library call and prints.
# ---------------------------------------------------------------------------------------------------

CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="Load these weights first: a state_dict saved with torch.save, or a checkpoint of "
    "`nmech train` (its 'model' entry).")]
SaveOpt = Annotated[Path | None, typer.Option("--out", help="Save the transformed model's state_dict here.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the example batch and certification.")]


def _read_state_dict(path: Path) -> dict:
    """The model state_dict in a torch.save file (a state_dict, or a dict with a 'model' state_dict)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NMechError(f"checkpoint {path} does not exist", "pass the path of a file written by torch.save") from None
    except Exception as exc:  # torch.load raises many types for files that are not checkpoints
        raise NMechError(f"cannot read {path} as a checkpoint: {exc}",
                         "pass a state_dict saved with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise NMechError(f"{path} holds no state_dict", "save one with torch.save(model.state_dict(), path)")
    return state


def _load_weights(net, path: Path | None, model: str) -> None:
    if path is None:
        return
    try:
        net.load_state_dict(_read_state_dict(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NMechError(f"the weights in {path} do not fit {model}: {first}",
                         "pass the MODEL (and --num-classes / --input-shape) the checkpoint was trained with") from None


def _load(model: str, input_shape: str | None, num_classes: int | None, batch: int, seed: int, eval_mode: bool):
    """(resolved model, the model, its seeded example batch) for a MODEL spec (`load_example`)."""
    resolved, inputs = _example(model, input_shape, None, None, num_classes, batch, seed, eval_mode)
    return resolved, resolved.model, inputs


def _certified_groups(net, inputs, seed: int):
    """find_symmetries + certification; groups whose action changes the loss are dropped (with a warning)."""
    found = find_symmetries(net, inputs)
    for warning in found.meta.get("warnings", []):
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    failed = uncertified_groups(net, found, inputs, seed) if len(found) else set()
    if failed:
        err_console.print(f"[yellow]{len(failed)} group(s) did not certify and are left out[/yellow]")
    return found.__class__([s for s in found if s.name not in failed], found.meta)


def _save(net, out: Path | None) -> None:
    if out is None:
        return
    import torch

    torch.save(net.state_dict(), out)
    console.print(f"state_dict written to [bold]{out}[/bold]")


@app.command()
def groups(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay of every group.")] = 5e-4,
    exclude_translation: Annotated[bool, typer.Option(
        "--exclude-translation", help="Put translation-invariant parameters in a group without weight decay.")
    ] = False,
    show_all: Annotated[bool, typer.Option("--all", help="Also list every parameter with each rule's answer.")] = False,
    seed: SeedOpt = 0,
) -> None:
    """Split the parameters into torch.optim groups (scale-invariant vs the rest) from certified symmetries,
    and show where timm's, nanoGPT's and the per-row rules disagree."""
    from .uses.heuristics import RULES, disagreements
    from .uses.param_groups import classify_parameters, param_groups

    resolved, net, inputs = _load(model, input_shape, num_classes, batch, seed, eval_mode=False)
    found = _certified_groups(net, inputs, seed)
    split = classify_parameters(net, found)
    pgs = param_groups(net, found, weight_decay=weight_decay, exclude_translation=exclude_translation)
    table = Table(title=f"param groups of {model} ({resolved.description})")
    for col, justify in (("group", "left"), ("tensors", "right"), ("entries", "right"), ("weight decay", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for g in pgs:
        table.add_row(g["name"], str(len(g["params"])), f"{sum(p.numel() for p in g['params']):,}",
                      f"{g['weight_decay']:g}")
    console.print(table)
    units: dict[str, int] = {}
    for info in split.params:
        if info.scale_invariant:
            units[info.unit] = units.get(info.unit, 0) + 1
    if units:
        console.print("scale-invariant units: " + ", ".join(f"{n} x {u}" for u, n in units.items()))
    for info in split.params:
        if info.reason:
            console.print(f"not scale-invariant: {info.name}: {info.reason}", markup=False)
    if show_all:
        ptable = Table(title="every parameter")
        for col in ("parameter", "shape", "certified", *[f"{r.name} ({r.says})" for r in RULES.values()]):
            ptable.add_column(col)
        for info in split.params:
            cert = info.unit if info.scale_invariant else ("translation" if info.translation_invariant else "-")
            ptable.add_row(info.name, "x".join(map(str, info.shape)) or "scalar", cert,
                           *["yes" if r.claims(info.name, info.shape) else "no" for r in RULES.values()])
        console.print(ptable)
    diffs = disagreements(split)
    for rule in RULES.values():
        n = sum(d.rule == rule.name for d in diffs)
        console.print(f"{rule.name} ({rule.description}): {n} disagreement(s) in {len(split.params)} parameters")
    if diffs:
        dtable = Table(title="where the rules disagree with the certified split")
        for col in ("rule", "parameter", "rule says", "certified", "why"):
            dtable.add_column(col)
        for d in diffs[:_MAX_ROWS]:
            dtable.add_row(d.rule, d.param, "yes" if d.rule_says else "no", "yes" if d.certified else "no", d.why)
        console.print(dtable)
        if len(diffs) > _MAX_ROWS:
            console.print(f"... and {len(diffs) - _MAX_ROWS} more (every parameter: --all)")


_MAX_ROWS = 40


@app.command("balance")
def balance_command(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    out: SaveOpt = None,
    scale_norm: Annotated[float | None, typer.Option("--scale-norm", help="Also move every scale group to this "
                                                     "norm |theta_A|.")] = None,
    tol: Annotated[float, typer.Option(help="Stop when every group is balanced to this relative residual.")] = 1e-10,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 4,
    seed: SeedOpt = 0,
) -> None:
    """Move every rescale group to the minimum-norm point of its orbit (|theta_A1| = |theta_A2|); the function
    is unchanged (checked on the example batch in float64)."""
    from .uses.balance import balance_with_result, imbalance
    from .uses.transforms import function_change

    _, net, inputs = _load(model, input_shape, num_classes, batch, seed, eval_mode=False)
    _load_weights(net, checkpoint, model)
    found = _certified_groups(net, inputs, seed)
    before = imbalance(net, found)
    with console.status("balancing ..."):
        balanced, result = balance_with_result(net, found, scale_norm=scale_norm, tol=tol)
    worst_before = max(before.values(), default=0.0)
    worst_after = max(imbalance(balanced, found).values(), default=0.0)
    console.print(f"{len(before)} rescale groups: largest |R| / (|A1|^2 + |A2|^2) {worst_before:.3g} -> "
                  f"{result.residual:.2g} in {result.sweeps} sweeps (float64), {worst_after:.3g} in the model's dtype")
    console.print(f"|theta|^2: {_sq_norm(net):.6g} -> {_sq_norm(balanced):.6g}; relative change of the outputs "
                  f"{function_change(net, balanced, inputs):.2e}")
    _save(balanced, out)


def _sq_norm(net) -> float:
    return float(sum(float(p.detach().double().pow(2).sum()) for p in net.parameters()))


@app.command("equalize")
def equalize_command(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    out: SaveOpt = None,
    fold_bn: Annotated[bool, typer.Option("--fold-bn/--no-fold-bn", help="Fold eval-mode BatchNorm into the "
                                          "preceding convolutions first (as DFQ does).")] = True,
    bits: Annotated[int, typer.Option(help="Bits of the per-tensor symmetric weight quantisation.")] = 8,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 32,
    seed: SeedOpt = 0,
) -> None:
    """Cross-layer equalisation (Nagel et al. 2019) on every certified rescale group of the eval-mode model, and
    the per-tensor weight quantisation error before and after."""
    from .uses.equalize import equalize_with_result
    from .uses.quantize import fold_batchnorm, quantization_error
    from .uses.transforms import function_change

    _, net, inputs = _load(model, input_shape, num_classes, batch, seed, eval_mode=True)
    _load_weights(net, checkpoint, model)
    if fold_bn:
        net = fold_batchnorm(net)
    found = _certified_groups(net, inputs, seed)
    with console.status("equalising ..."):
        eq, result = equalize_with_result(net, found)
    console.print(f"{result.equalized} rescale groups equalised in {result.sweeps} sweeps (max |log r1/r2| "
                  f"{result.residual:.2g}); {len(result.skipped)} without quantised weights on both sides left alone")
    table = Table(title=f"int{bits} per-tensor weight quantisation")
    for col in ("", "mean relative weight error", "relative output error", "top-1 agreement"):
        table.add_column(col, justify="right")
    for label, m in (("before", net), ("after", eq)):
        q = quantization_error(m, inputs, bits)
        table.add_row(label, f"{q.mean_weight_error:.4f}", f"{q.output_error:.4f}", f"{q.agreement:.3f}")
    console.print(table)
    console.print(f"relative change of the float outputs: {function_change(net, eq, inputs):.2e}")
    _save(eq, out)


@app.command()
def distance(
    model: ModelArg,
    checkpoint_a: Annotated[Path, typer.Argument(help="The first checkpoint (state_dict).")],
    checkpoint_b: Annotated[Path, typer.Argument(help="The second checkpoint (state_dict).")],
    out: SaveOpt = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    batch: BatchOpt = 4,
    seed: SeedOpt = 0,
) -> None:
    """The distance between two checkpoints up to symmetry: model A moved along its orbit as close to B as the
    groups allow (closed form per group, coordinate descent). --out saves the aligned A."""
    import copy

    from .uses.alignment import distance_up_to_symmetry
    from .uses.transforms import function_change

    _, net_a, inputs = _load(model, input_shape, num_classes, batch, seed, eval_mode=False)
    net_b = copy.deepcopy(net_a)
    _load_weights(net_a, checkpoint_a, model)
    _load_weights(net_b, checkpoint_b, model)
    found = _certified_groups(net_a, inputs, seed)
    with console.status("aligning ..."):
        al = distance_up_to_symmetry(net_a, net_b, found)
    console.print(f"plain distance {al.plain_distance:.6g}; up to symmetry {al.distance:.6g} "
                  f"({al.relative:.3g} of |B|) after {al.sweeps} sweeps over {len(found)} groups")
    if al.unaligned:
        console.print(f"{len(al.unaligned)} group(s) left in place (degenerate or anti-aligned)")
    console.print(f"relative change of A's outputs after alignment: {function_change(net_a, al.aligned, inputs):.2e}")
    _save(al.aligned, out)


@app.command("completeness")
def completeness_command(
    model: ModelArg,
    batch: Annotated[int | None, typer.Option("--batch", min=2, help="Inputs in the batch (default: twice the "
                                              "number needed for the Jacobian to have full row rank).")] = None,
    input_shape: InputShapeOpt = None,
    num_classes: NumClassesOpt = None,
    loss: LossOpt = "cross_entropy",
    seed: SeedOpt = 0,
) -> None:
    """Did we find them all? The directions that leave the outputs unchanged (null space of the output Jacobian)
    against the span of the certified groups' generators: "found k of n", per layer. Small models only."""
    from .experiments.specs import resolve_model
    from .uses.completeness import completeness, require_small

    resolved = resolve_model(model, num_classes=num_classes, input_shape=_parse_shape(input_shape))
    net = resolved.model.train()
    n_params = require_small(net)
    if batch is None:
        per_sample = max((resolved.num_classes or 2) - (1 if loss == "cross_entropy" else 0), 1)
        batch = max(2 * -(-n_params // per_sample), 16)
    inputs = resolved.example_inputs(batch, seed=seed)
    found = _certified_groups(net, inputs, seed)
    with console.status(f"Jacobian of {batch} inputs ..."):
        result = completeness(net, inputs, found, loss=loss, seed=seed)
    console.print(result.summary(), markup=False, highlight=False)


#: Loggers whose records are noise in front of a clean error: when capture in fake mode fails (a model that
#: rejects its example input), torch logs the whole failed meta-kernel traceback at ERROR level, and the capture
#: then re-runs the model for real and raises an InputShapeError that says the same in one line.
QUIET_LOGGERS = ("torch._subclasses.fake_tensor",)


def main() -> None:
    """Console-script entry point: user errors become a message and exit status 2."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        app()
    except NMechError as exc:
        # escaped: a message may hold brackets that are not markup (pip install 'neural-mechanics[hf]')
        err_console.print(f"[red]error:[/red] {escape(exc.what)}")
        if exc.fix:
            err_console.print(f"[cyan]what to do:[/cyan] {escape(exc.fix)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
