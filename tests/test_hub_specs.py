"""MODEL specs `timm:NAME` and `hf:CLASS` on the command line: built from code (random weights), `--set` overrides,
token inputs, and the errors (exit 2) for an unknown name or class, a bad key, a missing package, a too-large model.

Counts are the hand-derived ones of tests/test_hf_gpt2.py (the same tiny GPT-2 config, tied as GPT-2's default)
and tests/test_timm_models.py (vit_counts, read from the module tree).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from neural_mechanics import SymmetrySet
from neural_mechanics.errors import ModelSpecError
from neural_mechanics.experiments import hub_models
from neural_mechanics.experiments.hub_models import parse_overrides
from neural_mechanics.experiments.specs import resolve_model
from test_cli import run as nmech  # `nmech ARGS` in-process through the entry point: (code, stdout, stderr)
from test_detect_support import counts

torch.set_num_threads(1)
GPT2_TINY = ("--set", "n_layer=2", "--set", "n_embd=16", "--set", "n_head=2", "--set", "vocab_size=50",
             "--set", "n_positions=16")


def test_parse_overrides_is_typed():
    assert parse_overrides(["a=2", "b=0.5", "c=true", "d=False", "e=none", "f=gelu_new", "g = 1e-6"]) == {
        "a": 2, "b": 0.5, "c": True, "d": False, "e": None, "f": "gelu_new", "g": 1e-6}
    assert isinstance(parse_overrides(["a=2"])["a"], int)
    with pytest.raises(ModelSpecError, match="KEY=VALUE"):
        parse_overrides(["n_layer"])


def test_hf_gpt2_from_its_config_with_overrides(monkeypatch, capsys):
    pytest.importorskip("transformers")
    code, out, err = nmech(monkeypatch, capsys, "symmetries", "hf:GPT2LMHeadModel", *GPT2_TINY, "--input-shape", "8",
                           "--loss", "next_token", "--json")
    assert code == 0, err
    found = SymmetrySet.from_json(out)
    # tests/test_hf_gpt2.py, tied: per layer 4 E rescale + E key-bias translations (E = 16, 2 layers), and the
    # stream's scale group merged with ln_f's E groups into one rescale group
    assert counts(found) == (32, 0, 129)
    resolved = resolve_model("hf:GPT2LMHeadModel", overrides=parse_overrides(list(GPT2_TINY[1::2])))
    assert resolved.input_dtype == torch.long and resolved.vocab_size == 50 and resolved.input_shape == (16,)
    assert resolved.model.config.n_layer == 2 and resolved.model.config.n_embd == 16


def test_timm_vit_with_img_size_override(monkeypatch, capsys):
    pytest.importorskip("timm")
    from test_timm_models import vit_counts

    resolved = resolve_model("timm:vit_tiny_patch16_224", num_classes=10,
                             overrides={"img_size": 32, "depth": 2})
    assert resolved.input_shape == (3, 32, 32) and resolved.num_classes == 10
    code, out, err = nmech(monkeypatch, capsys, "symmetries", "timm:vit_tiny_patch16_224", "--num-classes", "10",
                           "--set", "img_size=32", "--set", "depth=2", "--json")
    assert code == 0, err
    assert counts(SymmetrySet.from_json(out)) == vit_counts(resolved.model) == (193 + 2 * 192, 1, 9 * 192)


@pytest.mark.parametrize(("args", "said"), [
    (("timm:resnet1800",), "timm has no model called 'resnet1800'"),
    (("timm:resnet18", "--set", "no_such_kwarg=1"), "timm could not build 'resnet18'"),
    (("hf:GPT2LMHeadModle",), "did you mean hf:GPT2LMHeadModel"),
    (("hf:GPT2Config",), "no model class called 'GPT2Config'"),
    (("hf:GPT2LMHeadModel", "--set", "n_layers=2"), "did you mean n_layer"),
    (("hf:LlamaForCausalLM",), "--set num_hidden_layers=2"),
    (("hf:T5ForConditionalGeneration", "--set", "num_layers=1"), "is an encoder-decoder model"),
    (("torchvision:resnet18", "--set", "depth=2"), "only timm:NAME and hf:CLASS models take overrides"),
], ids=["timm-name", "timm-kwarg", "hf-class", "hf-config-class", "hf-key", "hf-too-large", "hf-encoder-decoder",
                                  "set-elsewhere"])
def test_hub_spec_errors_exit_2(monkeypatch, capsys, args, said):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    code, _, err = nmech(monkeypatch, capsys, "symmetries", *args)
    assert code == 2
    assert said in " ".join(err.split())


@pytest.mark.parametrize(("spec", "extra"), [("timm:resnet18", "timm"), ("hf:GPT2LMHeadModel", "hf")],
                         ids=["timm", "hf"])
def test_missing_optional_package_says_what_to_install(monkeypatch, capsys, spec, extra):
    real = importlib.import_module

    def without(name, *a, **k):
        if name in ("timm", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(hub_models.importlib, "import_module", without)
    code, _, err = nmech(monkeypatch, capsys, "symmetries", spec)
    assert code == 2
    assert f"pip install 'neural-mechanics[{extra}]'" in " ".join(err.split())


def test_hf_vision_model_reads_pixels_from_its_config(monkeypatch, capsys):
    pytest.importorskip("transformers")
    args = ("--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2",
            "--set", "intermediate_size=64", "--set", "image_size=32", "--set", "patch_size=8")
    resolved = resolve_model("hf:ViTForImageClassification", num_classes=5, overrides=parse_overrides(list(args[1::2])))
    assert resolved.input_shape == (3, 32, 32) and resolved.input_dtype == torch.float32
    assert resolved.num_classes == 5 and resolved.model.config.num_labels == 5
    code, out, err = nmech(monkeypatch, capsys, "symmetries", "hf:ViTForImageClassification", *args,
                           "--num-classes", "5", "--json")
    assert code == 0, err
    # a pre-LN ViT of width C = 32, 1 block, 5 classes (test_timm_models.vit_counts): the stream is read only by
    # LayerNorms (1 scale group); norm affines -> q/k/v and fc1 columns, values, query/key pairs, final norm ->
    # classifier columns: 4 C + C rescale; classifier columns + bias and the key bias: C + 1 + C translations
    assert counts(SymmetrySet.from_json(out)) == (65, 1, 160)
