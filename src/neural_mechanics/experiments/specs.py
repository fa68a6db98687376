"""Turn a MODEL argument (a string) into a freshly built model plus the input shape it expects.

Every CLI command that takes a MODEL goes through `resolve_model`, so one string names a model the
same way everywhere:

- `torchvision:NAME`: `torchvision.models.get_model(NAME, weights=None[, num_classes=...])`. Weights are
  never downloaded - symmetries and their conservation laws are properties of the architecture and
  of training, not of a checkpoint.
- `package.module:factory`: imports the module (the current directory first, as `python -m` does:
  `experiments.importing`) and takes the attribute (dotted paths such as `pkg.mod:Outer.build` work). A callable
  is called, with `num_classes=` when it accepts it; a result that is an `nn.Module` class is instantiated the
  same way; an `nn.Module` instance is used as is.
- a preset name from `neural_mechanics.experiments.models.PRESETS` (e.g. `vgg16-bn-tinyimagenet`).
- `timm:NAME` and `hf:CLASS` (a transformers model class from its default config): `experiments.hub_models`, with
  `overrides` (`--set key=value`) passed to `timm.create_model` or the config.

The input shape (one example, no batch dimension) matters because symmetry detection and the
constraint checks run the model on example inputs. torchvision models get a per-family default (see
`torchvision_input_shape`); for a user's factory it is read from an `input_shape` attribute of the model
or factory if there is one, otherwise guessed from the first parameterised layer (Conv2d with C input
channels -> (C, 64, 64), Linear with F inputs -> (F,), ...). `input_shape=` overrides all of this.
A model whose first layer is an nn.Embedding reads token ids: its example inputs are integers below the
embedding's row count (`example_input_kind`; `input_dtype=` and `vocab_size=` say so explicitly), and the number
of tokens per example must come from `input_shape=` or an `input_shape` attribute.

The `package.module:factory` import is experiments/factory_models.py, the example-input kinds (floats or token ids)
experiments/input_kinds.py; this module resolves the other spellings and is the one entry point, `resolve_model`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from neural_mechanics.errors import ModelSpecError
from neural_mechanics.experiments.factory_models import infer_input_shape, infer_num_classes, resolve_import
from neural_mechanics.experiments.hub_models import HF_PREFIX, TIMM_PREFIX, HubModel, resolve_hf, resolve_timm
from neural_mechanics.experiments.input_kinds import (
    INPUT_DTYPES,
    dtype_name,
    example_input_kind,
    is_token_dtype,
    parse_input_dtype,
)
from neural_mechanics.experiments.models import PRESETS, get_preset

__all__ = [
    "DEFAULT_IMAGE_SHAPE",
    "INPUT_DTYPES",
    "TORCHVISION_INPUT_SHAPES",
    "TORCHVISION_PREFIX",
    "ResolvedModel",
    "example_input_kind",
    "parse_input_dtype",
    "resolve_model",
    "torchvision_input_shape",
    "torchvision_model_names",
]

TORCHVISION_PREFIX = "torchvision:"

# torchvision is imported inside the functions that need it, not at module level: importing it takes ~3 s of CPU
# (it loads torch._dynamo), which every `nmech` command, `nmech --help` included, would otherwise pay.


@dataclass(frozen=True, eq=False)
class ResolvedModel:
    """A built model and what is needed to feed it: `input_shape` is one example's shape, e.g. (3, 64, 64) or (64,).

    `num_classes` is the width of the output when it is known (None otherwise). `input_dtype` is what one example
    holds: a float dtype, or an integer dtype for token ids below `vocab_size` (`example_input_kind`).
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int | None
    spec: str
    description: str
    input_dtype: torch.dtype = torch.float32
    vocab_size: int | None = None

    def example_inputs(self, batch_size: int = 2, *, seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
        """A seeded batch of shape (batch_size, *input_shape): standard normal in `input_dtype`, or token ids uniform
        in [0, vocab_size) for an integer dtype."""
        gen = torch.Generator().manual_seed(seed)
        shape = (batch_size, *self.input_shape)
        if self.vocab_size is not None and not self.input_dtype.is_floating_point:
            return torch.randint(0, self.vocab_size, shape, generator=gen, dtype=self.input_dtype).to(device)
        return torch.randn(shape, generator=gen).to(device=device, dtype=self.input_dtype)


# -- torchvision -------------------------------------------------------------------------------

#: Default example-input shape by torchvision model-name prefix, first match wins; anything else that is an
#: image classifier or segmenter gets (3, 64, 64) (small CNNs with adaptive pooling run on it).
TORCHVISION_INPUT_SHAPES: tuple[tuple[str, tuple[int, ...], str], ...] = (
    ("vit_", (3, 224, 224), "ViT checks that the image size equals its image_size (224)"),
    ("swin3d_", (3, 16, 224, 224), "video Swin: (C, T, H, W)"),
    ("swin_", (3, 224, 224), "Swin windows are sized for 224x224"),
    ("maxvit_", (3, 224, 224), "MaxViT needs 224x224 (its partitions are fixed)"),
    ("inception_v3", (3, 299, 299), "Inception-v3 needs >= 75x75; 299x299 is its native size"),
    ("quantized_inception_v3", (3, 299, 299), "Inception-v3 needs >= 75x75; 299x299 is its native size"),
    ("mvit_", (3, 16, 224, 224), "video MViT: (C, T, H, W) with 16 frames of 224x224"),
    ("s3d", (3, 16, 224, 224), "video S3D: (C, T, H, W)"),
    ("r3d_", (3, 16, 112, 112), "video ResNet: (C, T, H, W)"),
    ("mc3_", (3, 16, 112, 112), "video ResNet: (C, T, H, W)"),
    ("r2plus1d_", (3, 16, 112, 112), "video ResNet: (C, T, H, W)"),
)
DEFAULT_IMAGE_SHAPE: tuple[int, ...] = (3, 64, 64)

#: torchvision families whose forward does not take one batched tensor (lists of images, targets, image pairs).
_UNSUPPORTED_TORCHVISION_MODULES = ("detection", "optical_flow")


def torchvision_model_names() -> list[str]:
    """All model names torchvision registers (`torchvision.models.list_models()`)."""
    import torchvision  # heavy: see TORCHVISION_PREFIX

    return sorted(torchvision.models.list_models())


def torchvision_input_shape(name: str) -> tuple[int, ...]:
    """The default example-input shape for torchvision model `name` (see TORCHVISION_INPUT_SHAPES)."""
    for prefix, shape, _why in TORCHVISION_INPUT_SHAPES:
        if name.startswith(prefix):
            return shape
    return DEFAULT_IMAGE_SHAPE


def _torchvision_family(name: str) -> str:
    import torchvision.models as tvm  # heavy: see TORCHVISION_PREFIX

    for family in ("detection", "optical_flow", "segmentation", "video", "quantization"):
        if name in tvm.list_models(module=getattr(tvm, family)):
            return family
    return "classification"


_TORCHVISION_DEFAULT_CLASSES = {"classification": 1000, "quantization": 1000, "segmentation": 21, "video": 400}


def _resolve_torchvision(spec: str, name: str, num_classes: int | None) -> ResolvedModel:
    import torchvision  # heavy: see TORCHVISION_PREFIX

    names = torchvision_model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join('torchvision:' + c for c in close)}? " if close else ""
        raise ModelSpecError(
            f"torchvision has no model called {name!r}",
            f"{hint}list them with `python -c 'import torchvision; print(torchvision.models.list_models())'`",
        )
    family = _torchvision_family(name)
    if family in _UNSUPPORTED_TORCHVISION_MODULES:
        raise ModelSpecError(
            f"torchvision:{name} is a {family.replace('_', ' ')} model; its forward takes lists of images (and "
            "targets), not one batched tensor",
            "wrap it in an nn.Module whose forward maps a tensor to a tensor and pass it as package.module:factory",
        )
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if family == "quantization":
        kwargs["quantize"] = False
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # segmentation builders default to downloading an ImageNet backbone
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except Exception as exc:  # torchvision raises ValueError/TypeError/AssertionError for bad kwargs
        raise ModelSpecError(
            f"torchvision could not build {name!r} with {kwargs}: {type(exc).__name__}: {exc}",
            "check num_classes (some models fix it) or build the model yourself and pass package.module:factory",
        ) from exc
    classes = num_classes if num_classes is not None else _TORCHVISION_DEFAULT_CLASSES.get(family)
    return ResolvedModel(
        model=model,
        input_shape=torchvision_input_shape(name),
        num_classes=classes,
        spec=spec,
        description=f"torchvision {name} ({family}, random init, no pretrained weights)",
    )


# -- entry point -------------------------------------------------------------------------------


def resolve_model(
    spec: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> ResolvedModel:
    """Build the model that `spec` names (torchvision:NAME, timm:NAME, hf:CLASS, package.module:factory or a preset;
    see module docs).

    `num_classes` overrides the model's default output width; `input_shape` overrides the default example shape;
    `input_dtype` and `vocab_size` say what the example inputs hold (see `example_input_kind`); `overrides` are the
    `--set key=value` of a timm: or hf: model (`hub_models.parse_overrides`).
    Raises ModelSpecError (with what went wrong and what to do) for anything that cannot be resolved.
    """
    spec = spec.strip()
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
    for prefix, resolve in ((TIMM_PREFIX, resolve_timm), (HF_PREFIX, resolve_hf)):
        if spec.startswith(prefix):
            hub = resolve(spec[len(prefix):].strip(), num_classes, overrides or {})
            return _from_hub(spec, hub, input_shape, input_dtype, vocab_size)
    if overrides:
        raise ModelSpecError(f"--set {', '.join(overrides)}: only timm:NAME and hf:CLASS models take overrides",
                             "drop --set, or build the model yourself and pass package.module:factory")
    if spec.startswith(TORCHVISION_PREFIX):
        resolved = _resolve_torchvision(spec, spec[len(TORCHVISION_PREFIX) :].strip(), num_classes)
        return _with_inputs(resolved, input_shape, input_dtype, vocab_size)
    if ":" in spec:
        model, shape, classes = resolve_import(spec, num_classes)
        dtype, vocab = example_input_kind(model, input_dtype, vocab_size)
        shape = input_shape or shape or (None if is_token_dtype(dtype) else infer_input_shape(model))
        if shape is None:
            tokens = f"token ids (dtype {dtype_name(dtype)}, vocabulary {vocab})" if vocab is not None else None
            raise ModelSpecError(
                f"cannot tell what input {spec} expects "
                + (f"(it reads {tokens}, but how many per example?)" if tokens else
                   "(its first layer is not a Conv or Linear)"),
                ("pass the sequence length, e.g. --input-shape 16" if tokens else
                 "pass an input shape (e.g. --input-shape 3,32,32)")
                + ", or give the model or factory an `input_shape` attribute",
            )
        if classes is None:
            classes = infer_num_classes(model)
        resolved = ResolvedModel(model, shape, classes, spec, f"{type(model).__name__} from {spec}", dtype, vocab)
        return resolved
    if spec not in PRESETS:
        _raise_unknown(spec)
    preset = get_preset(spec)
    resolved = ResolvedModel(
        model=preset.build(num_classes),
        input_shape=preset.input_shape,
        num_classes=num_classes if num_classes is not None else preset.num_classes,
        spec=spec,
        description=preset.description,
    )
    return _with_inputs(resolved, input_shape, input_dtype, vocab_size)


def _from_hub(spec: str, hub: HubModel, input_shape: tuple[int, ...] | None, input_dtype: torch.dtype | None,
              vocab_size: int | None) -> ResolvedModel:
    """A timm or transformers model with its example inputs: token ids below the config's vocabulary unless the
    options say otherwise."""
    if vocab_size is None and (input_dtype is None or is_token_dtype(input_dtype)):
        vocab_size = hub.vocab_size
    resolved = ResolvedModel(hub.model, hub.input_shape, hub.num_classes, spec, hub.description)
    return _with_inputs(resolved, input_shape, input_dtype, vocab_size)


def _with_inputs(resolved: ResolvedModel, input_shape: tuple[int, ...] | None, input_dtype: torch.dtype | None,
                 vocab_size: int | None) -> ResolvedModel:
    """`resolved` with the example-input shape, dtype and vocabulary it is fed (`example_input_kind`)."""
    dtype, vocab = example_input_kind(resolved.model, input_dtype, vocab_size)
    return dataclasses.replace(resolved, input_shape=input_shape or resolved.input_shape, input_dtype=dtype,
                               vocab_size=vocab)


def _raise_unknown(spec: str) -> NoReturn:
    close = difflib.get_close_matches(spec, list(PRESETS), n=3)
    hints = [f"did you mean the preset {', '.join(close)}?"] if close else []
    tv = torchvision_model_names()
    if spec in tv:
        hints.append(f"for the torchvision model write torchvision:{spec}.")
    hints.append(
        "a MODEL is torchvision:NAME, timm:NAME, hf:CLASS, package.module:factory, or one of the presets: "
        + ", ".join(PRESETS) + "."
    )
    raise ModelSpecError(f"unknown model {spec!r}", " ".join(hints))
