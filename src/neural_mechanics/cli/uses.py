"""Putting the symmetries to work (neural_mechanics.uses): `nmech groups`, `balance`, `equalize`, `distance` and
`completeness`. Each command resolves the model, finds and certifies its groups (uncertified ones are dropped with a
warning), makes one library call and prints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from ..errors import NMechError
from ..experiments.checks import uncertified_groups
from ..experiments.specs import resolve_model
from ..symmetry.detect import find_symmetries
from ..uses.alignment import distance_up_to_symmetry
from ..uses.balance import balance_with_result, imbalance
from ..uses.completeness import completeness, require_small
from ..uses.equalize import equalize_with_result
from ..uses.heuristics import RULES, disagreements
from ..uses.param_groups import classify_parameters, param_groups
from ..uses.quantize import fold_batchnorm, quantization_error
from ..uses.transforms import function_change
from .app import app, console, err_console
from .options import BatchOpt, InputShapeOpt, LossOpt, ModelArg, NumClassesOpt, example, parse_shape

CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="Load these weights first: a state_dict saved with torch.save, or a checkpoint of "
    "`nmech train` (its 'model' entry).")]
SaveOpt = Annotated[Path | None, typer.Option("--out", help="Save the transformed model's state_dict here.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the example batch and certification.")]


def _read_state_dict(path: Path) -> dict:
    """The model state_dict in a torch.save file (a state_dict, or a dict with a 'model' state_dict)."""
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
    resolved, inputs = example(model, input_shape, None, None, num_classes, batch, seed, eval_mode)
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
    resolved = resolve_model(model, num_classes=num_classes, input_shape=parse_shape(input_shape))
    net = resolved.model.train()
    n_params = require_small(net)
    if batch is None:
        per_sample = max((resolved.num_classes or 2) - (1 if loss == "cross_entropy" else 0), 1)
        batch = max(2 * -(-n_params // per_sample), 16)
    inputs = resolved.example_inputs(batch, seed=seed)
    found = _certified_groups(net, inputs, seed)
    with console.status(f"Jacobian of {batch} inputs ..."):
        result = completeness(net, inputs, found, loss=loss or "cross_entropy", seed=seed)
    console.print(result.summary(), markup=False, highlight=False)
