"""timm models: a ResNet with zero-initialised residual branches, a ConvNeXt with layer scale 1e-6, a ViT.

Each count is derived by hand from the model's module tree (the functions below read widths and depths from the
modules, never from the detector) and checked against the detector; the groups are certified at a generic point
(hf_support.certified: every parameter perturbed, zero-initialised ones included). The zero-initialised branches
are exactly where certifying at the model's own parameters proves nothing: a deliberately wrong group hidden in
such a branch leaves the loss unchanged at initialisation and is rejected at the generic point.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_support import assert_rejected, certified
from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry
from test_detect_support import counts

timm = pytest.importorskip("timm")
torch.set_num_threads(1)
CLASSES = 10


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs).train()


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def resnet_counts(m: nn.Module) -> tuple[int, int, int]:
    """BasicBlock ResNet: conv -> BN everywhere (train mode): every conv output channel is a scale group (the BN
    normalises it); each block's bn1 channel (ReLU, then read by conv2's column) is a rescale group; each stage's
    stream channel c (written by every block's bn2[c], the downsample BN or the stem's bn1, kept per channel by
    the ReLU after the residual add) is one rescale group, read by the next convolutions; the classifier: its
    columns and bias are translations."""
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    blocks = [b for stage in (m.layer1, m.layer2, m.layer3, m.layer4) for b in stage]
    streams = sum(stage[-1].bn2.num_features for stage in (m.layer1, m.layer2, m.layer3, m.layer4))
    return (m.fc.in_features + 1, sum(c.out_channels for c in convs),
            sum(b.bn1.num_features for b in blocks) + streams)


def convnext_counts(m: nn.Module) -> tuple[int, int, int]:
    """ConvNeXt (timm, conv MLP): stem conv -> LayerNorm2d; per block x + gamma * fc2(gelu(fc1(LN(dwconv(x)))));
    downsample = LayerNorm2d -> 2x2 conv; head pool -> LayerNorm2d -> fc.
    scale: the stem conv (its LayerNorm2d) and each block's depthwise conv (normalised jointly by the block's LN).
    rescale: each stage's stream (written by the stem norm's affine or the downsample conv, and every block's
    gamma; read by every depthwise conv's rows; normalised jointly by the next LayerNorm2d): ONE group per stage;
    per block, the LN affine channel d -> fc1's column d, and fc2's row c -> gamma[c] (the layer scale reads it):
    2 C; each downsample LayerNorm2d's affine -> the downsample conv's column; the head norm's affine -> fc's
    column. translation: fc's columns and bias."""
    blocks = [b for s in m.stages for b in s.blocks]
    downs = [s.downsample[0] for s in m.stages if isinstance(s.downsample, nn.Sequential)]
    width = m.head.norm.normalized_shape[0]
    rescale = len(m.stages) + sum(2 * b.conv_dw.out_channels for b in blocks)
    rescale += sum(d.normalized_shape[0] for d in downs) + width
    return width + 1, 1 + len(blocks), rescale


def vit_counts(m: nn.Module) -> tuple[int, int, int]:
    """Pre-LN ViT: the stream (patch conv, cls token, pos embed, every proj and fc2) is read only by LayerNorms:
    1 scale group. Per block (width C): norm1 affine -> qkv's columns, norm2 affine -> fc1's columns, values (qkv's
    value row -> proj's column), query/key pairs (one head dim coordinate per group): 4 C rescale, and the key
    bias: C translations; the final norm's affine -> head's columns: C rescale; head: C + 1 translations."""
    c = m.embed_dim
    n = len(m.blocks)
    return c + 1 + n * c, 1, 4 * n * c + c


def test_resnet_with_zero_initialised_residual_branches():
    m, x = build("resnet18"), images()
    assert all(float(b.bn2.weight.detach().abs().max()) == 0 for s in (m.layer1, m.layer2) for b in s)  # zero_init_last
    s = find_symmetries(m, x)
    assert counts(s) == resnet_counts(m) == (513, 4800, 2880)
    assert set(s["rescale:layer1.0.bn1[3]"].members) == {
        Member("layer1.0.bn1.weight", 0, (3,), "in"), Member("layer1.0.bn1.bias", 0, (3,), "in"),
        Member("layer1.0.conv2.weight", 1, (3,), "out")}
    certified(m, s, x, loss="cross_entropy", sample=16)
    # a wrong pairing inside the zero-initialised branch of layer1.0 (bn1 channel 3 with conv2's column 4): at the
    # model's own parameters the branch outputs bn2(...) = 0, so the action changes nothing...
    wrong = Symmetry("rescale", "wrong", (Member("layer1.0.bn1.weight", 0, (3,), "in"),
                                          Member("layer1.0.conv2.weight", 1, (4,), "out")), "layer1.0")
    at_init = certify(m, [wrong], x, sample=None)
    assert at_init.results[0].rel_loss_change < 1e-12 and at_init.results[0].rel_output_change < 1e-12
    # ...and at a generic point it is rejected
    assert_rejected(m, wrong, x, loss="cross_entropy")


def test_convnext_with_layer_scale():
    m, x = build("convnext_atto"), images()
    gamma = m.stages[0].blocks[0].gamma
    assert float(gamma.detach().max()) == pytest.approx(1e-6)  # ls_init_value
    s = find_symmetries(m, x)
    assert counts(s) == convnext_counts(m) == (321, 13, 4284)
    b = "stages.1.blocks.0."
    # fc2's output channel c is read by the layer scale gamma[c]
    assert set(s[f"rescale:{b}mlp.fc2[5]"].members) == {
        Member(f"{b}mlp.fc2.weight", 0, (5,), "in"), Member(f"{b}mlp.fc2.bias", 0, (5,), "in"),
        Member(f"{b}gamma", 0, (5,), "out")}
    # stage 1's stream: the downsample conv and every block's gamma write it, every depthwise conv reads it
    stream = s["rescale:stages.1.downsample.1[0]"]
    assert {mm.param for mm in stream.members if mm.role == "in"} == {
        "stages.1.downsample.1.weight", "stages.1.downsample.1.bias", "stages.1.blocks.0.gamma",
        "stages.1.blocks.1.gamma"}
    assert {mm.param for mm in stream.members if mm.role == "out"} == {
        "stages.1.blocks.0.conv_dw.weight", "stages.1.blocks.1.conv_dw.weight"}
    assert all(mm.index == tuple(range(80)) for mm in stream.members)  # every channel of the stage at once
    certified(m, s, x, loss="cross_entropy", sample=16)
    # a wrong pairing behind the 1e-6 layer scale (fc2 row 5 with gamma[6]): at init its change is below an absolute
    # 1e-6, but certify judges it against a random move of the same coordinates (~1e-5) and rejects it even there...
    wrong = Symmetry("rescale", "wrong", (Member(f"{b}mlp.fc2.weight", 0, (5,), "in"),
                                          Member(f"{b}gamma", 0, (6,), "out")), b)
    (at_init,) = certify(m, [wrong], x, sample=None, perturbation=0).results
    assert at_init.rel_loss_change < 1e-6 and not at_init.passed and at_init.conclusive
    assert not certify(m, [wrong], x, sample=None).ok  # and at certify's own generic point
    # ...and at this test's generic point
    assert_rejected(m, wrong, x, loss="cross_entropy")


def test_vit():
    m, x = build("vit_tiny_patch16_224", img_size=32), images()
    s = find_symmetries(m, x)
    assert counts(s) == vit_counts(m) == (2497, 1, 9408)
    (stream,) = s.filter("scale")
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight"} <= set(stream.params)
    c = m.embed_dim
    key_bias = [g for g in s.filter("translation") if g.layer == "blocks.3.attn.qkv"]
    assert sorted(g.members[0].index[0] for g in key_bias) == list(range(c, 2 * c))
    pair = s["rescale:blocks.3.attn.qkv[7]~blocks.3.attn.qkv[199]"]
    assert set(pair.members) == {Member("blocks.3.attn.qkv.weight", 0, (7,), "in"),
                                 Member("blocks.3.attn.qkv.bias", 0, (7,), "in"),
                                 Member("blocks.3.attn.qkv.weight", 0, (c + 7,), "out"),
                                 Member("blocks.3.attn.qkv.bias", 0, (c + 7,), "out")}
    certified(copy.deepcopy(m), s, x, loss="cross_entropy", sample=24)
