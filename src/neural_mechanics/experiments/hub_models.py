"""Models of the two model hubs people train today, built from code with random weights: `timm:NAME`, `hf:CLASS`.

- `timm:NAME`: `timm.create_model(NAME, pretrained=False[, num_classes=...], **overrides)`; the example input is
  the model's `pretrained_cfg["input_size"]` (e.g. (3, 224, 224)), or (in_chans, S, S) when `img_size=S` is
  overridden.
- `hf:CLASS`: the transformers model class `CLASS` (e.g. GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM) built
  from its default config (`CLASS.config_class()`) with `overrides` applied as config keyword arguments (e.g.
  `num_hidden_layers=2`, `hidden_size=64`); `num_classes` sets `num_labels`. A config with a `vocab_size` reads
  token ids (DEFAULT_SEQ_LEN per example unless `--input-shape` says otherwise); a vision config (`image_size`,
  `num_channels`) reads (C, H, W) pixels. An encoder-decoder (T5, BART) needs decoder inputs too: refused, with
  what to do instead. Default configs are full size (LlamaConfig() is a 6.7e9-parameter model): a model over
  MAX_PARAMETERS is refused before a single weight is allocated (it is counted on the meta device), with the keys
  to shrink it.

Overrides come from the command line as `--set key=value` strings (`parse_overrides`: typed int, float, bool,
none, else a string). Weights are never downloaded. Errors are ModelSpecError: the package to pip install, close
matches for an unknown name or class, close matches for an unknown config key.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from neural_mechanics.errors import ModelSpecError

TIMM_PREFIX, HF_PREFIX = "timm:", "hf:"
#: Tokens per example of an `hf:` language model when `--input-shape` does not say.
DEFAULT_SEQ_LEN = 16
#: `hf:` models above this many parameters are refused (4 GB of float32 weights, then a float64 copy to certify).
MAX_PARAMETERS = 1_000_000_000
_EXTRA = {"timm": "timm", "transformers": "hf"}


@dataclass(frozen=True)
class HubModel:
    """A built hub model and its example input: one example's `input_shape`, token ids below `vocab_size` (None:
    float inputs), the output width `num_classes` when known."""

    model: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int | None
    description: str
    vocab_size: int | None = None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["n_layer=2", "tie_word_embeddings=false"]` -> {"n_layer": 2, "tie_word_embeddings": False}: each value is
    an int, a float, a bool (true/false), None (none/null) or else the string itself."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ModelSpecError(f"--set {item!r} is not KEY=VALUE", "e.g. --set num_hidden_layers=2")
        out[key.strip()] = _typed(text.strip())
    return out


def _typed(text: str) -> Any:
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _import(package: str) -> ModuleType:
    """The optional package (timm, transformers), imported here only: each costs seconds to import."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError:
        raise ModelSpecError(f"{package} is not installed, and the model spec needs it",
                             f"pip install 'neural-mechanics[{_EXTRA[package]}]' (or pip install {package})") from None


def _suggest(name: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""


# -- timm --------------------------------------------------------------------------------------


def resolve_timm(name: str, num_classes: int | None, overrides: dict[str, Any]) -> HubModel:
    """`timm.create_model(name, pretrained=False, ...)` (module docstring)."""
    timm = _import("timm")
    if not timm.is_model(name):
        raise ModelSpecError(f"timm has no model called {name!r}",
                             _suggest(name, timm.list_models(), TIMM_PREFIX)
                             + "list them with `python -c 'import timm; print(timm.list_models(\"*vit*\"))'`")
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # timm raises TypeError for unknown keywords, ValueError/AssertionError for bad values
        raise ModelSpecError(f"timm could not build {name!r} with {kwargs}: {type(exc).__name__}: {exc}",
                             "check the --set keys against the model's constructor (timm.create_model kwargs)"
                             ) from exc
    shape = tuple(int(s) for s in model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if "img_size" in overrides:
        size = overrides["img_size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(overrides.get("in_chans", shape[0])), height, width)
    elif "in_chans" in overrides:
        shape = (int(overrides["in_chans"]), *shape[1:])
    classes = getattr(model, "num_classes", num_classes)
    return HubModel(model, shape, int(classes) if isinstance(classes, int) and classes > 0 else None,
                    f"timm {name} (random init, no pretrained weights)")


# -- Hugging Face transformers -----------------------------------------------------------------


def _model_classes(transformers: ModuleType) -> list[str]:
    """The model class names transformers exports (names only: its lazy module imports nothing for this)."""
    return [n for n in dir(transformers) if n[:1].isupper() and ("For" in n or n.endswith("Model"))
            and not n.startswith(("TF", "Flax"))]


def _hf_class(transformers: ModuleType, name: str) -> Any:
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelSpecError(f"transformers has no model class called {name!r}",
                             _suggest(name, _model_classes(transformers), HF_PREFIX)
                             + "name a PyTorch model class, e.g. hf:GPT2LMHeadModel, hf:LlamaForCausalLM, "
                             "hf:BertForMaskedLM")
    return cls


def _hf_config(cls: Any, num_classes: int | None, overrides: dict[str, Any]) -> Any:
    """`cls.config_class(**overrides)`, every key checked against the default config's keys first (a config takes
    unknown keywords silently, so a typo would otherwise build the default model)."""
    config_class = cls.config_class
    default = config_class()
    known = set(default.to_dict()) | set(getattr(config_class, "attribute_map", {}))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=5, cutoff=0.5)
            raise ModelSpecError(f"--set {key}: {config_class.__name__} has no key {key!r}",
                                 (f"did you mean {', '.join(close)}? " if close else "")
                                 + f"the keys are those of `transformers.{config_class.__name__}().to_dict()`")
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    try:
        return config_class(**kwargs)
    except Exception as exc:  # configs validate values in __init__ (ValueError) or assert them
        raise ModelSpecError(f"{config_class.__name__}(**{kwargs}) failed: {type(exc).__name__}: {exc}",
                             "fix the --set values") from exc


def resolve_hf(name: str, num_classes: int | None, overrides: dict[str, Any]) -> HubModel:
    """A transformers model class from its default config with `overrides` (module docstring)."""
    transformers = _import("transformers")
    cls = _hf_class(transformers, name)
    config = _hf_config(cls, num_classes, overrides)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelSpecError(
            f"hf:{name} is an encoder-decoder model: its forward needs decoder inputs as well as input_ids, and the "
            "command line feeds one tensor",
            "call nm.find_symmetries(model, (input_ids, None, decoder_input_ids), loss=...) from Python (as "
            "tests/test_hf_encoders.py does for T5), or wrap the model in a module whose forward takes one tensor "
            "and pass it as package.module:factory")
    with torch.device("meta"):  # count the parameters without allocating them
        n_params = sum(p.numel() for p in cls(config).parameters())
    if n_params > MAX_PARAMETERS:
        raise ModelSpecError(
            f"hf:{name} with this config has {n_params / 1e9:.1f}e9 parameters (over {MAX_PARAMETERS / 1e9:.0f}e9)",
            "shrink it with --set, e.g. --set num_hidden_layers=2 --set hidden_size=64 --set intermediate_size=128 "
            "--set num_attention_heads=4 --set vocab_size=1000 (the symmetries are the architecture's, at any width)")
    try:
        model = cls(config)
    except Exception as exc:
        raise ModelSpecError(f"transformers could not build {name} from its config: {type(exc).__name__}: {exc}",
                             "fix the --set values") from exc
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        shape: tuple[int, ...] = (DEFAULT_SEQ_LEN,)
    else:
        vocab, size = None, getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(getattr(config, "num_channels", 3)), int(height), int(width))
    classes = num_classes if num_classes is not None else (
        int(config.num_labels) if "Classification" in name else None)
    return HubModel(model, shape, classes, f"transformers {name} ({n_params:,} parameters, random init, no "
                    "pretrained weights)", vocab)
