"""Parameter groups from certified symmetries: known splits derived by hand, checked against brute force.

The split's meaning is tested directly: multiplying every parameter of the "scale_invariant" group by one
factor (what weight decay does to a param group in one step) leaves the function unchanged (float64), while
doing the same to the "other" group changes it.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import neural_mechanics as nm
from neural_mechanics.experiments.models import get_preset
from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.uses.heuristics import RULES, disagreements
from uses_support import Llama, outputs64

torch.set_num_threads(1)


def _decayed(model: nn.Module, names: set[str], factor: float = 0.7) -> dict[str, torch.Tensor]:
    return {n: p.detach().double() * (factor if n in names else 1.0) for n, p in model.named_parameters()}


def _change(model: nn.Module, x, names: set[str]) -> float:
    base, _ = outputs64(model, x)
    moved, _ = outputs64(model, x, _decayed(model, names))
    return float((moved - base).abs().max() / base.abs().max())


def _check_optimizers(groups: list[dict], model: nn.Module) -> None:
    names = [g["name"] for g in groups]
    assert names[0] == "scale_invariant" and "other" in names
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        opt = cls(groups, lr=0.1)
        assert [g["name"] for g in opt.param_groups] == names


def test_vgg16_bn_split_by_hand():
    # the paper's VGG-16-BN: each of the 13 convs is followed by train-mode BN, so its rows + bias entries form one
    # scale group per channel and both tensors are fully covered; BN affines (rescale A1) and the classifier
    # (rescale + translation) are not scale-invariant; the last Linear is translation-invariant (softmax).
    torch.manual_seed(0)
    model = get_preset("vgg16-bn-tinyimagenet").build().train()
    x = torch.randn(2, 3, 64, 64)
    sym = nm.find_symmetries(model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    expected = {f"{c}.{k}" for c in convs for k in ("weight", "bias")}
    split = nm.classify_parameters(model, sym)
    assert set(split.scale_invariant) == expected
    assert {p.unit for p in split.params if p.scale_invariant} == {"rows"}
    assert split.translation_invariant == ["classifier.6.weight", "classifier.6.bias"]
    groups = nm.param_groups(model, sym, weight_decay=5e-4, scale_invariant={"lr": 0.05})
    _check_optimizers(groups, model)
    si, other = groups[0], groups[-1]
    assert len(si["params"]) == 26 and len(other["params"]) == 26 + 6  # 13 BN (weight, bias) + 3 Linear (w, b)
    assert si["lr"] == 0.05 and si["weight_decay"] == other["weight_decay"] == 5e-4
    # brute force: decaying the whole scale-invariant group is a symmetry; decaying the rest is not
    assert _change(model, x, set(split.scale_invariant)) < 1e-12
    assert _change(model, x, {n for n, _ in model.named_parameters()} - set(split.scale_invariant)) > 1e-3
    # the recipes, by hand: timm and nanoGPT exempt the 13 conv biases (scale-invariant) and decay the 3 classifier
    # matrices (not); the rows rule claims per-row units for the 3 classifier matrices and misses the conv biases
    diffs = disagreements(split)
    classifier = {"classifier.0.weight", "classifier.3.weight", "classifier.6.weight"}
    for rule in RULES:
        mine = {(d.param, d.rule_says) for d in diffs if d.rule == rule}
        assert mine == {(f"{c}.bias", False) for c in convs} | {(w, True) for w in classifier}, rule


def test_resnet18_split_by_hand():
    # torchvision resnet18: 20 bias-free convs (1 stem + 16 in blocks + 3 downsample), each followed by train-mode
    # BN -> 20 scale-invariant weights, per-row units; BN affines and fc are not
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    sym = nm.find_symmetries(model, x)
    split = nm.classify_parameters(model, sym)
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 20 and set(split.scale_invariant) == convs
    assert all(split[n].unit == "rows" for n in convs)
    assert split.translation_invariant == ["fc.weight", "fc.bias"]
    groups = nm.param_groups(model, sym, exclude_translation=True, weight_decay=1e-4)
    _check_optimizers(groups, model)
    assert [g["name"] for g in groups] == ["scale_invariant", "translation_invariant", "other"]
    assert [len(g["params"]) for g in groups] == [20, 2, 62 - 22]
    assert groups[1]["weight_decay"] == 0.0 and groups[2]["weight_decay"] == 1e-4
    assert _change(model, x, convs) < 1e-12
    # all three recipes agree with the split here except on fc.weight (decayed / per-row, but not invariant)
    assert {(d.rule, d.param) for d in disagreements(split)} == {(r, "fc.weight") for r in RULES}


def _vit_stream(model: nn.Module) -> set[str]:
    names = {"conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding"}
    for n, _ in model.named_parameters():
        if n.endswith(("self_attention.out_proj.weight", "self_attention.out_proj.bias", "mlp.3.weight", "mlp.3.bias")):
            names.add(n)
    return names


def test_small_vit_stream_is_one_joint_unit():
    # torchvision's VisionTransformer class at a small size: the pre-LN residual stream is read only by LayerNorms,
    # so every writer (patch embedding, class token, positions, attention out_proj, MLP output layer) is one scale
    # group. Each is "scale-invariant" only jointly: scaling all together changes nothing, scaling one alone does.
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3).train()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: every output would be 0
    x = torch.randn(3, 3, 16, 16)
    sym = nm.find_symmetries(model, x)
    split = nm.classify_parameters(model, sym)
    stream = _vit_stream(model)
    assert len(stream) == 4 + 2 * 4 and set(split.scale_invariant) == stream
    assert {split[n].unit for n in stream} == {f"joint with {len(stream) - 1} other parameters"}
    assert _change(model, x, stream) < 1e-12
    assert _change(model, x, {"encoder.layers.encoder_layer_0.mlp.3.weight"}) > 1e-4
    rows = {d.param for d in disagreements(split) if d.rule == "rows"}
    assert {n for n in stream if model.get_parameter(n).ndim >= 2} <= rows  # no row is a unit of its own


@pytest.mark.slow
def test_vit_b_16_split():
    # the same structure at full size: 4 + 12 x 4 stream parameters, one joint unit; nothing else is invariant
    model = torchvision.models.vit_b_16(num_classes=10).train()
    sym = nm.find_symmetries(model, torch.randn(2, 3, 224, 224))
    split = nm.classify_parameters(model, sym)
    stream = _vit_stream(model)
    assert len(stream) == 52 and set(split.scale_invariant) == stream
    assert {split[n].unit for n in stream} == {"joint with 51 other parameters"}
    _check_optimizers(nm.param_groups(model, sym, weight_decay=0.05), model)


def test_llama_style_stream_writers_are_jointly_invariant():
    # pre-RMSNorm decoder with a final RMSNorm: embedding, attention output and MLP down projections write the
    # residual stream, read only by RMSNorms -> one scale group; q/k/v, gate/up (read the normalised stream,
    # not normalised themselves), the RMSNorm gains and the head are not scale-invariant.
    torch.manual_seed(0)
    model = Llama().train()
    ids = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(0))
    sym = nm.find_symmetries(model, ids)
    assert nm.certify(model, sym, ids).ok
    split = nm.classify_parameters(model, sym)
    stream = {"emb.weight"} | {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("o", "down")}
    assert set(split.scale_invariant) == stream
    assert _change(model, ids, stream) < 1e-12
    # timm / nanoGPT decay every matrix: q, k, v, gate, up (x 2 blocks) and the head are not invariant
    expected = {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("q", "k", "v", "gate", "up")} | {"head.weight"}
    assert {d.param for d in disagreements(split) if d.rule == "nanogpt"} == expected


def test_hf_llama_what_the_detector_finds_today():
    # transformers' LlamaRMSNorm is written with pow/mean/rsqrt; the split follows whatever scale groups the
    # detector certifies on it: the residual stream writers as one joint unit if it finds the stream, nothing if not
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))

    def loss(out):
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten())

    sym = nm.find_symmetries(model, ids, loss=loss)
    split = nm.classify_parameters(model, sym)
    scale = sym.filter("scale")
    if len(scale) == 0:
        assert split.scale_invariant == []
    else:
        stream = {"model.embed_tokens.weight"} | {f"model.layers.{i}.{p}.weight" for i in range(2)
                                                  for p in ("self_attn.o_proj", "mlp.down_proj")}
        assert set(split.scale_invariant) == stream
    groups = nm.param_groups(model, sym, weight_decay=0.1)
    _check_optimizers(groups, model)
    assert len(groups[0]["params"]) == len(split.scale_invariant)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def _scale(name, *members):
    return Symmetry("scale", name, tuple(members))


def test_partial_coverage_and_closure_by_hand():
    model = _tiny()
    rows = [_scale(f"s{c}", Member("0.weight", 0, (c,)), Member("0.bias", 0, (c,))) for c in range(4)]
    split = nm.classify_parameters(model, rows)
    assert set(split.scale_invariant) == {"0.weight", "0.bias"}
    # drop one row: 0.weight and 0.bias are only partly covered -> neither is invariant
    split = nm.classify_parameters(model, rows[:3])
    assert split.scale_invariant == []
    assert "only part" in split["0.weight"].reason
    # a group tying 3.weight (fully covered) to the partly covered 0.bias: closure disqualifies 3.weight too
    tie = _scale("tie", Member("3.weight"), Member("0.bias", 0, (0,)))
    split = nm.classify_parameters(model, [*rows[:3], tie, _scale("b", Member("3.bias"))])
    assert "3.weight" not in split.scale_invariant and "shares scale group 'tie'" in split["3.weight"].reason
    assert split.scale_invariant == ["3.bias"]


def test_overlapping_scale_groups_are_not_a_safe_split():
    # two scale groups covering 3.weight twice: scaling the tensor by c multiplies the overlap by c^2 under the
    # composed group actions, so the uniform decay is not a composition of them -> refused
    model = _tiny()
    groups = [_scale("a", Member("3.weight")), _scale("b", Member("3.weight", 0, (0,)))]
    split = nm.classify_parameters(model, groups)
    assert split.scale_invariant == [] and "two scale groups" in split["3.weight"].reason


def test_frozen_parameters_are_left_out_and_errors_are_clear():
    model = _tiny()
    model[3].bias.requires_grad_(False)
    rows = [_scale(f"s{c}", Member("0.weight", 0, (c,)), Member("0.bias", 0, (c,))) for c in range(4)]
    groups = nm.param_groups(model, rows)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(nm.SymmetryUseError, match="does not have"):
        nm.param_groups(model, [_scale("x", Member("nope.weight"))])
    with pytest.raises(nm.SymmetryUseError, match="may not set"):
        nm.param_groups(model, rows, scale_invariant={"params": []})
