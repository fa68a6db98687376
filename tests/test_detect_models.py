"""find_symmetries on hand-built models: group counts derived by hand (in comments), every group certified.

Certification (test_detect_support.certify_groups): apply each group's action with `Symmetry.act` to
a float64 copy (eps ~ 0) and recompute loss and outputs; relative change must stay <= 1e-9.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics.errors import InputShapeError
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, SymmetrySet
from test_detect_support import certify_all_at_once, certify_groups, counts

torch.set_num_threads(1)


def mlp_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


# ---- MLPs --------------------------------------------------------------------------------------
def test_mlp_with_batchnorm_counts_members_and_certify():
    m = mlp_bn()
    x = torch.randn(4, 5)
    s = find_symmetries(m, x)
    # scale: 7 (rows+bias of Linear 0, each normalised by train BN); rescale: 7 (BN affine -> ReLU ->
    # columns of Linear 3) + 6 (Linear 3 rows+bias -> ReLU -> columns of Linear 5); translation: 6 + 1.
    assert counts(s) == (7, 7, 13)
    g = s["scale:0[3]"]
    assert set(g.members) == {Member("0.weight", 0, (3,)), Member("0.bias", 0, (3,))}
    g = s["rescale:1[3]"]
    assert set(g.members) == {Member("1.weight", 0, (3,), "in"), Member("1.bias", 0, (3,), "in"),
                              Member("3.weight", 1, (3,), "out")}
    g = s["rescale:3[5]"]
    assert set(g.members) == {Member("3.weight", 0, (5,), "in"), Member("3.bias", 0, (5,), "in"),
                              Member("5.weight", 1, (5,), "out")}
    assert s["translation:5[:,2]"].members == (Member("5.weight", 1, (2,)),)
    assert s["translation:5.bias"].members == (Member("5.bias"),)
    assert s["translation:5.bias"].layer == "5"
    assert any("batch_norm (train) normalises channel 3" in step for step in s["scale:0[3]"].chain)
    certify_groups(m, s, x)
    for kind in ("scale", "rescale", "translation"):
        certify_all_at_once(m, s, x, kind)


def test_mlp_without_batchnorm():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(3, 4)
    s = find_symmetries(m, x)
    assert counts(s) == (9, 0, 8)  # rescale: 8 hidden neurons; translation: 8 columns + bias
    certify_groups(m, s, x)


def test_leaky_relu_and_dropout_keep_rescale():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Dropout(0.3), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(4, 4)
    s = find_symmetries(m, x)
    # rescale: 6 (LeakyReLU and dropout masks are homogeneous); the Tanh layer gives none; translation 5 + 1.
    assert counts(s) == (6, 0, 6)
    assert s.meta["blocked_ops"] == {"aten.tanh": 1, "aten.log_softmax": 1}
    certify_groups(m, s, x)


def test_tanh_mlp_with_mse_has_no_symmetry():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh())
    for loss in ("mse", None):
        s = find_symmetries(m, torch.randn(2, 3), loss=loss)
        assert len(s) == 0
        assert s.meta["blocked_ops"].get("aten.tanh") == 2


def test_mse_has_no_translation_but_keeps_rescale():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(3, 4)
    s = find_symmetries(m, x, loss="mse")
    assert counts(s) == (0, 0, 8)
    certify_groups(m, s, x, loss="mse")


def test_callable_losses_are_captured_with_the_model():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(3, 4)
    y = torch.tensor([0, 2, 1])
    s = find_symmetries(m, x, loss=lambda out: F.cross_entropy(out, y))
    assert counts(s) == (9, 0, 8)
    s = find_symmetries(m, x, loss=lambda out: ((out - 1) ** 2).mean())
    assert counts(s) == (0, 0, 8)


def test_kinds_filter_and_json_roundtrip():
    m = mlp_bn()
    x = torch.randn(4, 5)
    s = find_symmetries(m, x, kinds=["scale"])
    assert counts(s) == (0, 7, 0)
    full = find_symmetries(m, x)
    back = SymmetrySet.from_json(full.to_json())
    assert [g.to_dict() for g in back] == [g.to_dict() for g in full]
    assert [g.name for g in find_symmetries(m, x)] == [g.name for g in full]  # stable names
    json.dumps(full.meta)  # meta is plain data


# ---- BatchNorm modes, frozen and shared parameters -----------------------------------------------
def test_eval_mode_batchnorm_has_no_scale_groups_and_warns():
    m = mlp_bn().eval()
    x = torch.randn(4, 5)
    s = find_symmetries(m, x)
    # eval BN is affine with running statistics: Linear 0's neurons are blocked; BN affine still writes
    # its output (rescale 7) and Linear 3 -> Linear 5 stays (rescale 6); translation 7.
    assert counts(s) == (7, 0, 13)
    assert not m.training
    (w,) = s.meta["warnings"]
    assert "eval-mode BatchNorm" in w and "model.train()" in w and "running statistics" in w
    assert s.meta["blocked_ops"]["aten.batch_norm (eval mode: running statistics)"] == 1
    certify_groups(m, s, x)


def test_model_is_not_modified():
    m = mlp_bn()
    m[1].running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 5)
    rng = torch.get_rng_state()
    find_symmetries(m, x)
    assert m.training
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_parameters_are_excluded():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m[0].weight.requires_grad_(False)
    m[2].bias.requires_grad_(False)
    x = torch.randn(3, 4)
    s = find_symmetries(m, x)
    # hidden neurons need Linear 0's rows (frozen) -> no rescale; translation: 8 columns, no bias group.
    assert counts(s) == (8, 0, 0)
    assert sorted(s.meta["frozen"]) == ["0.weight", "2.bias"]
    assert all(mm.param not in s.meta["frozen"] for g in s for mm in g.members)
    certify_groups(m, s, x)


class SharedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return self.out(h)


def test_shared_parameter_used_twice_is_left_out():
    torch.manual_seed(6)
    m = SharedTwice()
    x = torch.randn(3, 4)
    s = find_symmetries(m, x)
    # `shared` is read and written twice: scaling its slices would act on both uses, so it is in no group;
    # inp's neurons are read only by `shared` -> none; out: translation 6 + 1.
    assert counts(s) == (7, 0, 0)
    assert sorted(s.meta["shared"]) == ["shared.bias", "shared.weight"]
    assert any("more than one operation" in w for w in s.meta["warnings"])
    certify_groups(m, s, x)


# ---- functional forward, concat, residual, index maps ------------------------------------------
class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 6, 3, padding=1)
        self.skip = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        y = F.max_pool2d(y, 2)
        z = F.relu(self.c(y) + self.skip(y))
        z = F.max_pool2d(z, 2)
        return self.fc(torch.flatten(z, 1))


def test_functional_ops_concat_and_residual_add():
    torch.manual_seed(7)
    m = Functional()
    x = torch.randn(2, 3, 16, 16)
    s = find_symmetries(m, x)
    # rescale: a (4) and b (5) channels, read through the concat by c and skip at offsets 0..3 / 4..8;
    # the add ties channel k of c and of skip: 6 classes read by fc through a 4x4 block of 16 columns each.
    # translation: fc has 96 columns + bias.
    assert counts(s) == (97, 0, 15)
    g = s["rescale:b[0]"]
    assert set(g.members) == {Member("b.weight", 0, (0,), "in"), Member("b.bias", 0, (0,), "in"),
                              Member("c.weight", 1, (4,), "out"), Member("skip.weight", 1, (4,), "out")}
    g = s["rescale:c[2]"]
    assert set(g.members) == {Member("c.weight", 0, (2,), "in"), Member("c.bias", 0, (2,), "in"),
                              Member("skip.weight", 0, (2,), "in"), Member("skip.bias", 0, (2,), "in"),
                              Member("fc.weight", 1, tuple(range(32, 48)), "out")}
    assert any("aten.add" in step for step in g.chain)
    certify_groups(m, s, x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(3, 4)
        self.q = nn.Linear(2, 5)
        self.head = nn.Linear(9, 2)

    def forward(self, x1, x2):
        return self.head(torch.cat([F.relu(self.p(x1)), F.relu(self.q(x2))], dim=-1))


def test_multiple_inputs_and_concat_of_two_branches():
    torch.manual_seed(8)
    m = TwoInputs()
    x = (torch.randn(3, 3), torch.randn(3, 2))
    s = find_symmetries(m, x)
    assert counts(s) == (10, 0, 9)  # 4 + 5 neurons; head 9 columns + bias
    assert s["rescale:q[1]"].members[-1] == Member("head.weight", 1, (5,), "out")
    assert s.meta["input_shapes"] == [[3, 3], [3, 2]]
    certify_groups(m, s, x)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 1)
        self.c1 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.c0(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle, 2 groups
        y = F.relu(self.c1(y))
        return self.fc(y.mean((2, 3)))


def test_channel_shuffle_maps_indices():
    torch.manual_seed(9)
    m = Shuffle()
    x = torch.randn(2, 3, 5, 5)
    s = find_symmetries(m, x)
    assert counts(s) == (5, 0, 12)  # 8 + 4 neurons; fc 4 columns + bias
    for c in range(8):  # input channel c = g*4 + i lands at output channel i*2 + g
        g, i = divmod(c, 4)
        assert s[f"rescale:c0[{c}]"].members[-1] == Member("c1.weight", 1, (i * 2 + g,), "out")
    certify_groups(m, s, x)


def test_depthwise_and_grouped_convolutions():
    torch.manual_seed(10)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    )
    x = torch.randn(2, 3, 6, 6)
    s = find_symmetries(m, x)
    # scale 8 (conv 0 + BN); rescale: BN affine read by depthwise rows (8), depthwise rows+bias read by
    # the pointwise columns (8), pointwise read by the Linear (4); translation 4 + 1.
    assert counts(s) == (5, 8, 20)
    assert s["rescale:1[2]"].members[-1] == Member("3.weight", 0, (2,), "out")
    assert s["rescale:3[2]"].members[0] == Member("3.weight", 0, (2,), "in")
    certify_groups(m, s, x)

    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=2), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    x = torch.randn(2, 3, 3, 3)
    s = find_symmetries(grouped, x)
    # a grouped conv with 4 input channels per group reads a 2-D block per channel: input channel
    # k = 4 g + l is read by weight[2g:2g+2, l] (a Member with a sub restriction). rescale: conv 0's 8
    # neurons (A2 = that block) + conv 2's 4 channels -> Linear; translation 36 + 1.
    assert counts(s) == (37, 0, 12)
    assert "aten.conv2d (grouped)" not in s.meta["blocked_ops"]
    g = s["rescale:0[6]"]
    assert g.members[-1] == Member("2.weight", 0, (2, 3), "out", sub_dim=1, sub_index=(2,))
    assert g.members[-1].to_dict()["sub"] == {"dim": 1, "index": [2]}
    assert "weight[2:4, 2] of group 1" in "\n".join(g.chain)
    # the block is exactly 2 rows x 1 column x 1 x 1 of the (4, 4, 1, 1) weight
    mask = g.members[-1].mask(grouped[2].weight)
    assert mask.sum() == 2 and mask[2:4, 2].all()
    certify_groups(grouped, s, x)


# ---- normalisers and layer scale -----------------------------------------------------------------
def test_layernorm_merges_the_whole_writer_into_one_scale_group():
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(3, 4)
    s = find_symmetries(m, x)
    # LayerNorm normalises all 6 features jointly: one scale group = all of Linear 0; LN affine 6 rescale.
    assert counts(s) == (7, 1, 6)
    (g,) = s.filter("scale")
    assert set(g.members) == {Member("0.weight", 0, tuple(range(6))), Member("0.bias", 0, tuple(range(6)))}
    certify_groups(m, s, x)


def test_groupnorm_scale_groups_per_group():
    torch.manual_seed(12)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(2, 3, 6, 6)
    s = find_symmetries(m, x)
    # scale: 2 groups of 4 channels of conv 0; rescale: GN affine 8 + conv 3's 4 channels; translation 5.
    assert counts(s) == (5, 2, 12)
    assert {g.members[0].index for g in s.filter("scale")} == {(0, 1, 2, 3), (4, 5, 6, 7)}
    certify_groups(m, s, x)


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.gamma * F.relu(self.a(x)))


def test_layer_scale_is_reader_and_writer():
    torch.manual_seed(13)
    m = LayerScale()
    x = torch.randn(3, 4)
    s = find_symmetries(m, x)
    # a's neuron c is read by gamma[c] (rescale 6); gamma[c] writes a channel read by b's column c (6 more).
    assert counts(s) == (7, 0, 12)
    assert set(s["rescale:a[1]"].members) == {Member("a.weight", 0, (1,), "in"), Member("a.bias", 0, (1,), "in"),
                                              Member("gamma", 0, (1,), "out")}
    assert set(s["rescale:gamma[1]"].members) == {Member("gamma", 0, (1,), "in"), Member("b.weight", 1, (1,), "out")}
    certify_groups(m, s, x)


def test_gelu_blocks_and_is_reported():
    m = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3))
    s = find_symmetries(m, torch.randn(3, 4))
    assert counts(s) == (7, 0, 0)
    assert s.meta["blocked_ops"]["aten.gelu"] == 2


# ---- input errors -----------------------------------------------------------------------------
def test_wrong_input_shape_raises_input_shape_error():
    m = mlp_bn()
    with pytest.raises(InputShapeError) as e:
        find_symmetries(m, torch.randn(4, 6))
    assert "[(4, 6)]" in str(e.value) and "what to do" in str(e.value)
    with pytest.raises(InputShapeError):
        find_symmetries(m, "not a tensor")


def test_model_assertion_on_the_input_is_an_input_shape_error():
    """torchvision's ViT checks the image size with torch._assert (an AssertionError), as many models do."""
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8,
                          num_classes=3)
    with pytest.raises(InputShapeError) as e:
        find_symmetries(m, torch.randn(2, 3, 16, 16))
    assert "Wrong image height" in str(e.value) and "[(2, 3, 16, 16)]" in str(e.value)


def test_meta_records_capture_facts():
    s = find_symmetries(mlp_bn(), torch.randn(4, 5))
    assert s.meta["capture"].startswith("make_fx")
    assert s.meta["graph_nodes"] > 10
    assert s.meta["loss"] == "cross_entropy"
    assert s.meta["input_shapes"] == [[4, 5]]


# ---- attention, data-dependent control flow, unused branches, capture failures -----------------------
class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos).mean(1))


def test_post_norm_transformer_layer():
    torch.manual_seed(14)
    m = TinyTransformer()
    x = torch.randint(0, 10, (2, 5))
    s = find_symmetries(m, x)
    # attention: score = sum_c q_c k_c, so query row c (in_proj rows 0:8 + bias) x alpha with key row c (rows 8:16
    # + bias) x 1/alpha leaves every score unchanged: 8 query/key rescale pairs; given the weights the output is
    # linear in v, so each value channel (in_proj rows 16:24 + bias) is read by out_proj's column: 8 rescale
    # groups; the FFN hidden ReLU
    # gives 16 rescale groups; norm2's affine
    # is read by the head through the token mean (8). Two whole-stream groups: (emb columns + pos +
    # out_proj rows, read by in_proj, normalised jointly by norm1) and (norm1 affine + linear2 rows, read by
    # linear1, normalised by norm2). Translation: head 8 columns + bias, and the 8 key-bias coordinates
    # in_proj_bias[8:16] (q . (k_j + b) = q . k_j + q . b is constant over keys j: the softmax ignores it).
    assert counts(s) == (17, 0, 42)
    value = s["rescale:enc.self_attn.in_proj_weight[16]"]
    assert set(value.members) == {Member("enc.self_attn.in_proj_weight", 0, (16,), "in"),
                                  Member("enc.self_attn.in_proj_bias", 0, (16,), "in"),
                                  Member("enc.self_attn.out_proj.weight", 1, (0,), "out")}
    assert any("value channel" in step for step in value.chain)
    key_bias = [g for g in s.filter("translation") if g.members[0].param == "enc.self_attn.in_proj_bias"]
    assert [g.members[0].index for g in key_bias] == [(j,) for j in range(8, 16)]
    assert "aten.scaled_dot_product_attention (queries, keys)" not in s.meta["blocked_ops"]
    qk = s["rescale:enc.self_attn.in_proj_weight[3]~enc.self_attn.in_proj_weight[11]"]
    assert set(qk.members) == {Member("enc.self_attn.in_proj_weight", 0, (3,), "in"),
                               Member("enc.self_attn.in_proj_bias", 0, (3,), "in"),
                               Member("enc.self_attn.in_proj_weight", 0, (11,), "out"),
                               Member("enc.self_attn.in_proj_bias", 0, (11,), "out")}
    stream = s["rescale:emb[0]"]
    assert {mm.param for mm in stream.members if mm.role == "in"} == {
        "emb.weight", "pos", "enc.self_attn.out_proj.weight", "enc.self_attn.out_proj.bias"}
    assert {mm.param for mm in stream.members if mm.role == "out"} == {"enc.self_attn.in_proj_weight"}
    certify_groups(m, s, x)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        _ = self.unused(h)  # computed, never used: constrains nothing
        if h.sum() > 0:  # the branch is read into Python: h's channels count as blocked
            h = h * 2
        return self.b(h)


def test_data_dependent_branch_is_recorded_and_blocks_the_channels_it_reads():
    torch.manual_seed(15)
    m = DataDependent()
    x = torch.randn(3, 3)
    s = find_symmetries(m, x)
    assert counts(s) == (5, 0, 0)  # b: 4 columns + bias; a's neurons reach Python through h.sum() > 0
    assert any("into Python" in w for w in s.meta["warnings"])
    certify_groups(m, s, x)


def test_unused_branch_does_not_block():
    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.aux = nn.Linear(4, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            torch.tanh(self.aux(h))  # result dropped
            return self.b(h)

    torch.manual_seed(16)
    m = Aux()
    x = torch.randn(3, 3)
    s = find_symmetries(m, x)
    assert counts(s) == (5, 0, 4)
    assert "aux.weight" not in s["rescale:a[0]"].params
    certify_groups(m, s, x)


def test_torch_export_fallback_gives_the_same_groups(monkeypatch):
    from neural_mechanics.symmetry import capture as cap

    def broken(*args, **kwargs):
        raise RuntimeError("make_fx unavailable")

    m = mlp_bn()
    x = torch.randn(4, 5)
    reference = find_symmetries(m, x)
    monkeypatch.setattr(cap, "_make_fx", broken)
    s = find_symmetries(m, x)
    assert s.meta["capture"].startswith("torch.export")
    assert [g.to_dict() for g in s] == [g.to_dict() for g in reference]


def test_capture_failure_names_the_mechanisms(monkeypatch):
    from neural_mechanics.errors import CaptureError
    from neural_mechanics.symmetry import capture as cap

    def broken(*args, **kwargs):
        raise RuntimeError("aten.foo is not traceable")

    monkeypatch.setattr(cap, "_make_fx", broken)
    monkeypatch.setattr(cap, "_export", broken)
    with pytest.raises(CaptureError) as e:
        find_symmetries(mlp_bn(), torch.randn(4, 5))
    assert "aten.foo is not traceable" in str(e.value) and "make_fx" in str(e.value) and "torch.export" in str(e.value)


def test_describe_graph_lists_ops_and_classes():
    from neural_mechanics.symmetry.detect import describe_graph

    text = describe_graph(mlp_bn(), torch.randn(4, 5))
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "aten.batch_norm" in lines["batch_norm"]
    # the first Linear writes 7 slots, none tainted (BN absorbs their scale); log_softmax's input is tainted
    assert lines["linear"].split()[-3:] == ["7", "7", "0"]
    assert lines["linear_2"].split()[-3:] == ["3", "1", "1"]


class Zoo(nn.Module):
    """Less common ops: transposed and 1-D convs, InstanceNorm, RMSNorm, pixel shuffle, reflect padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.c1 = nn.Conv2d(2, 6, 3)
        self.prelu = nn.PReLU(6)
        self.c2 = nn.Conv1d(6, 5, 1)
        self.rms = nn.RMSNorm(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        y = F.relu(self.inorm(self.c0(x)))
        y = F.relu(self.up(y))  # (N, 8, 2H, 2W)
        y = F.pixel_unshuffle(F.pixel_shuffle(y, 2), 2)
        y = F.avg_pool2d(y, 2)
        y = F.pad(y[:, :2], (1, 1, 1, 1), mode="reflect")  # slice the first 2 channels
        y = self.prelu(self.c1(y))
        y = F.interpolate(y.flatten(2), scale_factor=2)  # (N, 6, L)
        y = self.c2(y).mean(-1)
        return self.fc(F.relu(self.rms(y)))


def test_zoo_of_less_common_ops():
    torch.manual_seed(17)
    m = Zoo()
    x = torch.randn(3, 3, 6, 6)
    s = find_symmetries(m, x)
    # scale: 8 (c0 channels, instance-normalised), 1 (c2 whole, RMS-normalised jointly);
    # rescale: up channels 0, 1 read by c1 (6 other channels are sliced away: read by nobody -> unused),
    #   inorm affine 8 (read by `up`, rows W[k]), c1's 6 channels through PReLU read by c2, rms affine 5;
    # translation: fc 5 columns + bias.
    assert counts(s) == (6, 9, 21)
    assert s.meta["unused_classes"] == 6
    assert s["rescale:inorm[3]"].members[-1] == Member("up.weight", 0, (3,), "out")
    assert s["rescale:up[1]"].members[0] == Member("up.weight", 1, (1,), "in")
    certify_groups(m, s, x)
