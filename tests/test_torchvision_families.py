"""Per-family facts about torchvision classifiers: which symmetries must exist and which must not.

Every family of `torchvision.models` gets one small representative. Each test states the structure the
detector must find (derived by hand from the torchvision source, in the comments), the symmetries that
must NOT be there (non-homogeneous activations, normalised-away readers, heads that never reach the
loss), and certifies the groups it names by applying their action to a float64 copy
(test_detect_support.certify_groups: relative change of loss and outputs <= 1e-9). Every representative's
counts must equal the hand derivation from its module tree (tests/zoo_expectations.py, `_assert_derived`).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import Tensor

from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, SymmetrySet
from test_detect_support import certify_groups
from test_torchvision_support import aux_softmax_loss, randomize_zeros
from zoo_expectations import derive

torch.set_num_threads(1)


@functools.cache
def _detected(name: str, size: int = 32, **kwargs) -> tuple[torch.nn.Module, Tensor, SymmetrySet]:
    torch.manual_seed(0)
    model = randomize_zeros(torchvision.models.get_model(name, num_classes=10, **kwargs)).train()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x, find_symmetries(model, x)


def _assert_derived(model: torch.nn.Module, s: SymmetrySet, aux_in_loss: bool = False) -> None:
    """The detector's (translation, scale, rescale) equal the hand derivation from the model's module tree."""
    c = s.counts()
    assert (c["translation"], c["scale"], c["rescale"]) == derive(model, aux_in_loss), s.details()


def _params_in(s: SymmetrySet, kind: str | None = None) -> set[str]:
    return {m.param for g in s if kind is None or g.kind == kind for m in g.members}


# ---- grouped convolutions: ResNeXt, RegNet -------------------------------------------------------
def test_resnext_grouped_conv_reads_a_block_per_channel():
    m, x, s = _detected("resnext50_32x4d")
    _assert_derived(m, s)
    # layer1.0.conv2: Conv2d(128, 128, 3, groups=32): 4 input channels per group. Input channel k = 4 g + l
    # (written by bn1[k] through ReLU) is read by weight[4g:4g+4, l]: a block. bn1[6] -> group 1, l = 2.
    g = s["rescale:layer1.0.bn1[6]"]
    assert set(g.members) == {Member("layer1.0.bn1.weight", 0, (6,), "in"), Member("layer1.0.bn1.bias", 0, (6,), "in"),
                              Member("layer1.0.conv2.weight", 0, (4, 5, 6, 7), "out", 1, (2,))}
    assert any("of group 1" in step for step in g.chain)
    # nothing is blocked by grouped convolutions any more: every bn1 / bn2 channel has its rescale group
    assert not any("grouped" in k for k in s.meta["blocked_ops"])
    assert sum(g.name.startswith("rescale:layer1.0.bn2[") for g in s) == 128
    blocks = [g for g in s if any(mm.sub_dim is not None for mm in g.members)]
    certify_groups(m, blocks, x, sample=6)


@pytest.mark.slow
def test_regnet_y_grouped_conv_and_squeeze_excitation():
    m, x, s = _detected("regnet_y_400mf")
    _assert_derived(m, s)
    # RegNetY block: a (1x1, BN, ReLU) -> b (3x3 grouped, group width 8, BN, ReLU) -> SE -> c (1x1, BN).
    # b's input channel 8 g + l is read by the block b.0.weight[8g:8g+8, l]; SE: x * sigmoid(fc2(relu(fc1(
    # mean x)))): the gate does not move when x's channel scales (fc1 absorbs it through the mean), so the
    # product passes b's channels on to c, and fc1 -> ReLU -> fc2 is a rescale of its own.
    g = s["rescale:trunk_output.block1.block1-0.f.a.1[9]"]
    assert Member("trunk_output.block1.block1-0.f.b.0.weight", 0, tuple(range(8, 16)), "out", 1, (1,)) in g.members
    g = s["rescale:trunk_output.block1.block1-0.f.b.1[3]"]
    readers = {mm.param for mm in g.members if mm.role == "out"}
    assert readers == {"trunk_output.block1.block1-0.f.se.fc1.weight", "trunk_output.block1.block1-0.f.c.0.weight"}
    assert "rescale:trunk_output.block1.block1-0.f.se.fc1[0]" in s
    # the sigmoid gate's own input (fc2's output) cannot be rescaled
    assert "trunk_output.block1.block1-0.f.se.fc2.weight" not in _params_in(s, "rescale") - {
        mm.param for g in s for mm in g.members if mm.role == "out"}
    certify_groups(m, [s["rescale:trunk_output.block1.block1-0.f.a.1[9]"], g,
                       s["rescale:trunk_output.block1.block1-0.f.se.fc1[0]"]], x)


# ---- concatenation: DenseNet, SqueezeNet, GoogLeNet, Inception -----------------------------------------
def test_densenet_concatenated_channel_is_normalised_by_every_later_layer():
    m, x, s = _detected("densenet121")
    _assert_derived(m, s)
    # denselayer1.conv2 writes channel 64 of the block's concatenation; every later layer of the block
    # (norm1 of layers 2..6) and the transition normalise it per channel (train BN): a scale group, no
    # rescale (nothing reads it but normalisers).
    g = s["scale:features.denseblock1.denselayer1.conv2[0]"]
    assert g.members == (Member("features.denseblock1.denselayer1.conv2.weight", 0, (0,)),)
    assert sum("normalises channel 64" in step for step in g.chain) == 6
    assert not any(g.layer == "features.denseblock1.denselayer1.conv2" for g in s.filter("rescale"))
    # norm1 of layer 2 (affine, then ReLU) is read by that layer's conv1 column 64
    g = s["rescale:features.denseblock1.denselayer2.norm1[64]"]
    assert Member("features.denseblock1.denselayer2.conv1.weight", 1, (64,), "out") in g.members
    certify_groups(m, [s["scale:features.denseblock1.denselayer1.conv2[0]"], g], x)


def test_squeezenet_concat_offsets_and_no_translation():
    m, x, s = _detected("squeezenet1_0")
    _assert_derived(m, s)
    # Fire: cat([relu(expand1x1), relu(expand3x3)]): expand3x3's channel 0 sits at 64 in the next squeeze.
    g = s["rescale:features.3.expand3x3[0]"]
    assert Member("features.4.squeeze.weight", 1, (64,), "out") in g.members
    # the classifier is conv -> ReLU -> average pool: the ReLU breaks the softmax shift, so there is no
    # translation symmetry at all, while the final conv's channels are still rescalable? No: nothing
    # reads them after the ReLU but the loss, so they are tainted.
    assert s.counts()["translation"] == 0
    assert "classifier.1.weight" not in {mm.param for g in s for mm in g.members if mm.role == "in"}
    certify_groups(m, [g], x)


def test_googlenet_default_loss_uses_main_logits_and_ignores_aux_heads():
    m, x, s = _detected("googlenet", aux_logits=True, init_weights=True)
    _assert_derived(m, s)
    # train mode returns GoogLeNetOutputs(logits, aux_logits2, aux_logits1); the default loss reads the main
    # logits (the first tensor), so the auxiliary heads never reach it and get no groups.
    assert isinstance(m(x), tuple)
    assert not any(p.startswith(("aux1.", "aux2.")) for p in _params_in(s))
    assert "translation:fc.bias" in s
    # inception branches are concatenated: inception3a.branch2 (a 1x1 -> 3x3 path, 128 channels) lands at
    # 64 in inception3b's inputs
    g = s["rescale:inception3a.branch2.1.bn[0]"]
    assert Member("inception3b.branch1.conv.weight", 1, (64,), "out") in g.members
    certify_groups(m, [g, s["translation:fc.bias"]], x)


def test_googlenet_aux_loss_gives_the_aux_heads_their_groups():
    torch.manual_seed(0)
    m = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=True).train()
    x = torch.randn(2, 3, 32, 32)
    s = find_symmetries(m, x, loss=aux_softmax_loss)
    _assert_derived(m, s, aux_in_loss=True)
    # each aux head: conv -> BN -> ReLU -> fc1 -> ReLU -> dropout -> fc2 (-> softmax): fc2's 1024 columns +
    # bias are translations, fc1's 1024 neurons rescale.
    assert "translation:aux1.fc2.bias" in s and "translation:aux2.fc2[:,1023]" in s
    assert "rescale:aux1.fc1[0]" in s
    report = certify(m, s, x, loss=aux_softmax_loss, sample=4)
    assert report.ok, report.summary()


@pytest.mark.slow
def test_inception_v3_input_transform_and_aux_head():
    torch.manual_seed(0)
    m = torchvision.models.inception_v3(num_classes=10, aux_logits=True, init_weights=True,
                                        transform_input=True).train()
    x = torch.randn(2, 3, 299, 299)
    s = find_symmetries(m, x)
    _assert_derived(m, s)
    # transform_input rescales each input channel by constants: no parameter involved, nothing changes for the
    # first conv (it is normalised by BN: one scale group per channel).
    assert "scale:Conv2d_1a_3x3.conv[0]" in s
    assert not any(p.startswith("AuxLogits.") for p in _params_in(s))
    certify_groups(m, [s["scale:Conv2d_1a_3x3.conv[0]"], s["translation:fc.bias"]], x)


# ---- channel shuffle ---------------------------------------------------------------------------
def test_shufflenet_channel_shuffle_maps_indices():
    m, x, s = _detected("shufflenet_v2_x0_5")
    _assert_derived(m, s)
    # stage2 units (48 channels): out = shuffle(cat(x1, branch2(x2)), 2). branch2's channel c sits at 24 + c
    # before the shuffle and at 2c + 1 after it; the next unit splits at 24: c = 20 -> 41 -> x2[17], read by
    # stage2.2.branch2.0's column 17.
    g = s["rescale:stage2.1.branch2.6[20]"]
    assert Member("stage2.2.branch2.0.weight", 1, (17,), "out") in g.members
    # c = 2 -> 5 -> x1, passed on: 5 -> shuffled (unit 2) -> 10 -> x1 -> 20 (unit 3) -> read by stage3.0
    # (a stride-2 unit: both branches read the whole input, branch1 depthwise rows, branch2 columns).
    g2 = s["rescale:stage2.1.branch2.6[2]"]
    assert {mm for mm in g2.members if mm.role == "out"} == {
        Member("stage3.0.branch1.0.weight", 0, (20,), "out"), Member("stage3.0.branch2.0.weight", 1, (20,), "out")}
    certify_groups(m, [g, g2], x)


# ---- non-homogeneous activations: MobileNet, EfficientNet ------------------------------------------
def test_mobilenet_v3_no_rescale_through_hardswish():
    m, x, s = _detected("mobilenet_v3_small")
    _assert_derived(m, s)
    # features.0 = conv -> BN -> Hardswish: the stem BN has no rescale group (hardswish(a x) != a hardswish(x)),
    # while its conv is normalised by BN (scale).
    assert "features.0.1.weight" not in _params_in(s, "rescale")
    assert "scale:features.0.0[0]" in s
    assert s.meta["blocked_ops"]["aten.hardswish_"] > 0
    # features.1: depthwise conv -> BN -> ReLU -> SE -> project. The SE gate is computed from the mean of x
    # through fc1, which absorbs x's scale, so x * gate passes the channel on: BN[c] is read by fc1's
    # column c and by the projection's column c. SE's fc1 -> ReLU -> fc2 is a rescale too; fc2 -> hardsigmoid
    # is not.
    g = s["rescale:features.1.block.0.1[0]"]
    assert {mm for mm in g.members if mm.role == "out"} == {
        Member("features.1.block.1.fc1.weight", 1, (0,), "out"), Member("features.1.block.2.0.weight", 1, (0,), "out")}
    assert "rescale:features.1.block.1.fc1[0]" in s
    assert not any(g.layer == "features.1.block.1.fc2" for g in s.filter("rescale"))
    certify_groups(m, [g, s["rescale:features.1.block.1.fc1[0]"]], x)


def test_mobilenet_v2_relu6_is_not_homogeneous():
    m, x, s = _detected("mobilenet_v2")
    _assert_derived(m, s)
    # ReLU6 = hardtanh(0, 6): clipping at 6 is not positively homogeneous -> every BN before a ReLU6 has no
    # rescale group; the linear bottleneck (projection conv -> BN, no activation) is read by the next
    # expansion conv: a rescale through the identity (and the residual adds).
    assert s.meta["blocked_ops"]["aten.hardtanh_"] == 35
    assert "features.1.conv.0.1.weight" not in _params_in(s, "rescale")
    g = s["rescale:features.1.conv.2[0]"]
    assert Member("features.2.conv.0.0.weight", 1, (0,), "out") in g.members
    certify_groups(m, [g], x)


def test_efficientnet_no_rescale_through_silu():
    m, x, s = _detected("efficientnet_b0")
    _assert_derived(m, s)
    # MBConv: expand (conv, BN, SiLU) -> depthwise (conv, BN, SiLU) -> SE (fc1, SiLU, fc2, sigmoid) -> project
    # (conv, BN). SiLU blocks every BN before it and SE's fc1; only the projection BNs (linear bottleneck) have
    # rescale groups, read by the next expansion conv.
    assert s.meta["blocked_ops"]["aten.silu_"] == 49
    rescaled = {g.layer for g in s.filter("rescale")}
    assert all(".block.2.1" in layer or ".block.3.1" in layer or layer.startswith("features.1.0.block.2")
               for layer in rescaled if layer.startswith("features.")), sorted(rescaled)[:10]
    assert not any("fc1" in p for p in _params_in(s, "rescale"))
    g = s["rescale:features.1.0.block.2.1[0]"]
    assert g.members[-1] == Member("features.2.0.block.0.0.weight", 1, (0,), "out")
    certify_groups(m, [g, s["scale:features.1.0.block.0.0[0]"]], x)


# ---- ConvNeXt: channels-last LayerNorm, layer scale ------------------------------------------------
def test_convnext_layer_norm_and_layer_scale():
    m, x, s = _detected("convnext_tiny")
    _assert_derived(m, s)
    # CNBlock: dwconv -> permute -> LayerNorm(C) -> Linear -> GELU -> Linear -> permute -> layer_scale * y -> +x.
    # The LayerNorm normalises all C channels jointly: the whole dwconv is one scale group.
    g = s["scale:features.1.0.block.0[0]"]
    assert set(g.members) == {Member("features.1.0.block.0.weight", 0, tuple(range(96))),
                              Member("features.1.0.block.0.bias", 0, tuple(range(96)))}
    # The second Linear's feature c is read by layer_scale[c] (a per-channel product, homogeneous).
    g2 = s["rescale:features.1.0.block.5[3]"]
    assert set(g2.members) == {Member("features.1.0.block.5.weight", 0, (3,), "in"),
                               Member("features.1.0.block.5.bias", 0, (3,), "in"),
                               Member("features.1.0.layer_scale", 0, (3,), "out")}
    # GELU: the first Linear has no rescale group
    assert not any(g.layer == "features.1.0.block.3" for g in s.filter("rescale"))
    assert s.meta["blocked_ops"]["aten.gelu"] == 18
    certify_groups(m, [g, g2], x)


# ---- transformers: ViT, Swin ------------------------------------------------------------------
def test_vit_key_bias_pre_ln_stream_and_no_rescale_through_gelu():
    m, x, s = _detected("vit_b_16", image_size=32)
    _assert_derived(m, s)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    # key bias: in_proj_bias[768:1536] of every layer, one translation group per coordinate
    key = [g for g in s.filter("translation") if g.members[0].param.endswith("in_proj_bias")]
    assert len(key) == 12 * 768
    assert {g.members[0].index[0] for g in key} == set(range(768, 1536))  # never a query or value coordinate
    # the pre-LN residual stream: read only by LayerNorms (ln_1, ln_2 of every layer, the final encoder.ln),
    # written by conv_proj, class_token, pos_embedding, every out_proj and MLP fc2: one scale group
    (stream,) = s.filter("scale")
    written = {mm.param for mm in stream.members}
    expected = {"conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding"}
    for layer in layers:
        expected |= {f"{layer}.self_attention.out_proj.weight", f"{layer}.self_attention.out_proj.bias",
                     f"{layer}.mlp.3.weight", f"{layer}.mlp.3.bias"}
    assert written == expected
    # no rescale through GELU: the MLP's first Linear writes into no group (it only reads ln_2's features)
    fc1 = [(g.kind, mm) for g in s for mm in g.members if ".mlp.0." in mm.param]
    assert fc1 and all(kind == "rescale" and mm.role == "out" and mm.dim == 1 for kind, mm in fc1)
    # ln_1's affine is read by in_proj's columns (attention consumes in_proj's output: a barrier after that)
    assert Member(f"{layers[0]}.self_attention.in_proj_weight", 1, (5,), "out") in s[
        f"rescale:{layers[0]}.ln_1[5]"].members
    # softmax translation of the classifier: 768 columns + bias
    assert sum(g.layer == "heads.head" for g in s.filter("translation")) == 769
    # attention is linear in the values once the weights are fixed: value channel i (in_proj rows 1536 + i)
    # is read by out_proj's column i
    value = s[f"rescale:{layers[2]}.self_attention.in_proj_weight[1541]"]
    assert Member(f"{layers[2]}.self_attention.out_proj.weight", 1, (5,), "out") in value.members
    value_rows = {i for g in s.filter("rescale") for mm in g.members if mm.param.endswith("in_proj_weight")
                  and mm.dim == 0 and any(x.param.endswith("out_proj.weight") for x in g.members) for i in mm.index}
    assert value_rows == set(range(1536, 2304))
    # queries and keys: score = sum_c q_c k_c per head, so query row r (A1, with its bias) pairs with key row
    # 768 + r (A2): 768 rescale groups per layer, nothing else
    pairs = [g for g in s.filter("rescale") if all(mm.dim == 0 for mm in g.members)]
    assert len(pairs) == 12 * 768 and s.counts()["rescale"] == 28416 + 12 * 768
    w, b = f"{layers[4]}.self_attention.in_proj_weight", f"{layers[4]}.self_attention.in_proj_bias"
    assert set(s[f"rescale:{w}[3]~{w}[771]"].members) == {
        Member(w, 0, (3,), "in"), Member(b, 0, (3,), "in"), Member(w, 0, (771,), "out"), Member(b, 0, (771,), "out")}
    assert {(mm.index[0], mm.role) for g in pairs for mm in g.members if mm.param.endswith("in_proj_weight")} == {
        *((r, "in") for r in range(768)), *((r, "out") for r in range(768, 1536))}
    assert not any("scaled_dot_product_attention" in k for k in s.meta["blocked_ops"])
    certify_groups(m, [stream, key[0], key[-1], s[f"rescale:{layers[3]}.ln_2[7]"], value, pairs[0], pairs[-1]], x)
    assert any("scaled_dot_product_attention" in step for step in key[0].chain)
    assert any("score = sum_c q_c k_c" in step for step in pairs[0].chain)


def test_swin_key_bias_and_stage_streams():
    m, x, s = _detected("swin_t")
    _assert_derived(m, s)
    # window attention is written out by hand: q @ k^T + relative position bias (+ shift mask) -> softmax.
    # qkv.bias[C:2C] shifts every key of a window equally: one translation group per coordinate.
    depths, dims = (2, 2, 6, 2), (96, 192, 384, 768)
    key = [g for g in s.filter("translation") if g.members[0].param.endswith("attn.qkv.bias")]
    assert len(key) == sum(d * c for d, c in zip(depths, dims, strict=True))
    assert all(c <= g.members[0].index[0] < 2 * c for g in key
               for c in [dims[(int(g.members[0].param.split(".")[1]) - 1) // 2]])
    # each stage's pre-LN stream is read only by LayerNorms (norm1/norm2, PatchMerging's norm, the final norm):
    # a scale group with the stage's writer (patch embedding LN / PatchMerging reduction), attn.proj, mlp.3.
    assert {g.name for g in s.filter("scale")} == {
        "scale:features.0.0[0]", "scale:features.0.2[0]", "scale:features.2.reduction[0]",
        "scale:features.4.reduction[0]", "scale:features.6.reduction[0]"}
    stage1 = {mm.param for mm in s["scale:features.0.2[0]"].members}
    assert {"features.1.0.attn.proj.weight", "features.1.1.mlp.3.bias"} <= stage1
    # queries and keys: (q * scale) @ k^T pairs query row r of qkv (A1, with its bias) with key row C + r (A2):
    # C rescale groups per block, the explicit matmul is no longer a barrier
    pairs = [g for g in s.filter("rescale") if all(mm.dim == 0 for mm in g.members)]
    assert len(pairs) == sum(d * c for d, c in zip(depths, dims, strict=True))
    assert s.counts()["rescale"] == 16704 + len(pairs)
    w, b = "features.5.3.attn.qkv.weight", "features.5.3.attn.qkv.bias"
    pair = s["rescale:features.5.3.attn.qkv[7]~features.5.3.attn.qkv[391]"]
    assert set(pair.members) == {Member(w, 0, (7,), "in"), Member(b, 0, (7,), "in"), Member(w, 0, (391,), "out"),
                                 Member(b, 0, (391,), "out")}
    assert "aten.matmul" not in s.meta["blocked_ops"]
    certify_groups(m, [key[0], key[-1], s["scale:features.0.2[0]"], s["scale:features.4.reduction[0]"], pairs[0],
                       pairs[-1], pair], x)


def test_swin_v2_cosine_attention_has_no_key_bias_translation():
    m, x, s = _detected("swin_v2_t")
    _assert_derived(m, s)
    # V2 normalises q and k (cosine attention) and zeroes the key part of qkv.bias: no key-bias translation,
    # and no query/key rescale pair (F.normalize is not homogeneous per coordinate): qkv's rows are in rescale
    # groups only as values (rows 2C..3C of a block of width C, read by proj's column), its bias computed in forward
    # (a clone with the key part zeroed) moving with them.
    assert not any(g.members[0].param.endswith("qkv.bias") for g in s.filter("translation"))
    for g in s.filter("rescale"):
        for mm in g.members:
            if mm.param.endswith("qkv.weight") and mm.dim == 0:
                width = m.get_submodule(mm.param.removesuffix(".qkv.weight")).proj.in_features
                assert all(2 * width <= i < 3 * width for i in mm.index), g.name
    value = [g for g in s.filter("rescale")
             if any(mm.param == "features.1.0.attn.qkv.weight" and mm.index == (2 * 96 + 5,) for mm in g.members)]
    assert len(value) == 1 and {(mm.param, mm.dim, mm.index) for mm in value[0].members} == {
        ("features.1.0.attn.qkv.weight", 0, (197,)), ("features.1.0.attn.qkv.bias", 0, (197,)),
        ("features.1.0.attn.proj.weight", 1, (5,))}
    assert s.counts()["rescale"] == 12001
    # post-norm blocks: x + norm1(attn(x)): each attn.proj / mlp.3 writes into its own LayerNorm -> scale
    assert "scale:features.1.0.attn.proj[0]" in s and "scale:features.1.1.mlp.3[0]" in s
    certify_groups(m, [s["scale:features.1.0.attn.proj[0]"]], x)
