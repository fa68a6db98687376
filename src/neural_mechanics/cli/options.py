"""The options several commands share (MODEL and its example batch, the loss) and their parsing."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import NMechError
from ..experiments.checks import load_example
from ..experiments.hub_models import parse_overrides
from ..experiments.objectives import Objective, build_objective, get_objective
from ..experiments.specs import parse_input_dtype

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
    str | None,
    typer.Option("--loss", help="What the outputs feed: cross_entropy (softmax over --class-dim; per-pixel "
                 "logits (N, C, H, W) too), next_token (token logits (B, T, V): softmax over the vocabulary) or mse "
                 "(no softmax, so no translation symmetry). Default: cross_entropy over the vocabulary (last) axis "
                 "of token logits (B, T, V), else over axis 1.", show_default=False),
]
ClassDimOpt = Annotated[
    int | None,
    typer.Option("--class-dim", help="cross_entropy: the axis of the outputs that holds the classes (default: the "
                 "last axis of token logits (B, T, V), else 1)."),
]
EvalOpt = Annotated[bool, typer.Option("--eval", help="Analyse the model in eval mode (BatchNorm then uses running "
                                       "statistics and has no scale symmetry).")]


def example(model: str, input_shape: str | None, input_dtype: str | None, vocab: int | None, num_classes: int | None,
             batch: int, seed: int, eval_mode: bool = False, overrides: list[str] | None = None) -> tuple[Any, Any]:
    """The resolved model and its example batch, from the shared MODEL options (`overrides`: the `--set KEY=VALUE`
    of a timm: / hf: model)."""
    return load_example(model, input_shape=parse_shape(input_shape), num_classes=num_classes, batch=batch, seed=seed,
                        eval_mode=eval_mode, input_dtype=parse_input_dtype(input_dtype) if input_dtype else None,
                        vocab_size=vocab, overrides=parse_overrides(overrides))


def parse_shape(text: str | None) -> tuple[int, ...] | None:
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


def objective_for(loss: str | None, class_dim: int | None) -> Objective:
    """The loss of `symmetries` / `check`: cross_entropy (the default, or named) takes its class axis by the library's
    rule (`symmetry.loss.class_axis`: the vocabulary axis of token logits) unless --class-dim says otherwise."""
    if loss is not None and get_objective(loss).name != "cross_entropy":
        return build_objective(loss, class_dim)
    return build_objective(None, class_dim)

