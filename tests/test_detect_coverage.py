"""Edge cases of detection named after what they exercise: block members (grouped convolutions),
non-homogeneous activations, reshaped layer scale, weight norm, frozen parameters, buffers, and the
readable chains that `nmech symmetries MODEL --explain NAME` prints.

Every detected group is certified by brute force (test_detect_support.certify_groups: the reference
action `Symmetry.act` on a float64 copy, loss and outputs recomputed).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from test_detect_support import certify_groups, counts

torch.set_num_threads(1)


# ---- block members --------------------------------------------------------------------------------
def test_block_member_mask_numel_describe_and_json():
    w = torch.zeros(8, 4, 3, 3)
    m = Member("conv.weight", 0, (2, 3), "out", sub_dim=1, sub_index=(1,))
    mask = m.mask(w)
    ref = torch.zeros_like(w, dtype=torch.bool)
    ref[2:4, 1] = True
    assert torch.equal(mask, ref)
    assert m.numel(w) == int(ref.sum()) == 2 * 9
    assert m.describe() == "conv.weight[dim 0: 2:4; dim 1: 1] (A2)"
    d = m.to_dict()
    assert d == {"param": "conv.weight", "dim": 0, "index": [2, 3], "role": "out", "sub": {"dim": 1, "index": [1]}}
    assert Member.from_dict(json.loads(json.dumps(d))) == m
    # plain members keep the exact contract {"param", "dim", "index", "role"} (no new key)
    assert set(Member("a", 0, (1,)).to_dict()) == {"param", "dim", "index", "role"}
    assert Member.from_dict({"param": "a", "dim": 0, "index": [1], "role": None}).sub_dim is None
    with pytest.raises(ValueError, match="sub_dim and sub_index"):
        Member("a", 0, (1,), sub_dim=1)
    with pytest.raises(ValueError, match="needs dim"):
        Member("a", sub_dim=1, sub_index=(0,))
    with pytest.raises(ValueError, match="sub index"):
        Member("conv.weight", 0, (1,), sub_dim=1, sub_index=(4,)).check({"conv.weight": w})


def test_block_member_in_a_symmetry_roundtrips_and_acts_on_the_block_only():
    params = {"a.weight": torch.randn(4), "c.weight": torch.randn(6, 2, 1, 1)}
    sym = Symmetry("rescale", "rescale:a[1]", (Member("a.weight", 0, (1,), "in"),
                                               Member("c.weight", 0, (0, 1, 2), "out", 1, (1,))))
    back = SymmetrySet.from_json(SymmetrySet([sym]).to_json())[0]
    assert back == sym
    moved = sym.act(params, 2.0)
    expected = params["c.weight"].clone()
    expected[0:3, 1] /= 2.0
    assert torch.equal(moved["c.weight"], expected)
    p64 = {k: v.double() for k, v in params.items()}
    assert float(sym.charge(params)) == pytest.approx(
        float(p64["a.weight"][1] ** 2 - (p64["c.weight"][0:3, 1] ** 2).sum()), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), data=st.data())
def test_block_member_numel_matches_its_mask(shape, data):
    t = torch.zeros(shape)
    dim = data.draw(st.integers(0, len(shape) - 1))
    sub = data.draw(st.integers(0, len(shape) - 1))
    index = tuple(data.draw(st.lists(st.integers(0, shape[dim] - 1), min_size=1, max_size=4)))
    sub_index = tuple(data.draw(st.lists(st.integers(0, shape[sub] - 1), min_size=1, max_size=4)))
    m = Member("p", dim, index, None, sub, sub_index)
    assert m.numel(t) == int(m.mask(t).sum())


def test_incidence_engine_reduces_and_expands_block_members_like_masks():
    """symmetry/incidence.py (the compiled engine of certify, geometry and the tracker) against Symmetry.masks()."""
    from neural_mechanics.symmetry.incidence import GroupIncidence

    params = {"a": torch.randn(6), "w": torch.randn(8, 4, 3, 3), "b": torch.randn(8)}
    syms = [
        Symmetry("rescale", "r1", (Member("a", 0, (1,), "in"), Member("w", 0, (0, 1), "out", 1, (1,)),
                                   Member("w", 0, (2, 3), "out", 1, (0, 2)))),
        Symmetry("rescale", "r2", (Member("w", 0, (4,), "in"), Member("b", 0, (4,), "in"),
                                   Member("w", 0, (0, 1), "out", 1, (3,)))),
        Symmetry("scale", "s", (Member("w", 0, (5, 6), None, 1, (0,)), Member("w", 0, (6,)))),
    ]
    inc = GroupIncidence(syms, params)
    fields = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in params.items()}
    reduced = inc.reduce(fields).double().cpu()
    masks = [s.masks(params) for s in syms]
    ref = torch.tensor([sum(float((m.double() * fields[k]).sum()) for k, m in ms.items()) for ms in masks],
                       dtype=torch.float64)
    assert torch.allclose(reduced, ref, rtol=1e-10, atol=1e-10)
    coef = torch.randn(len(syms), dtype=torch.float64)
    expanded = inc.expand(coef)
    for k, v in params.items():
        want = sum(float(c) * ms.get(k, torch.zeros_like(v)).double() for c, ms in zip(coef, masks, strict=True))
        assert torch.allclose(expanded.get(k, torch.zeros_like(v, dtype=torch.float64)).cpu(), want)
    bad = Symmetry("rescale", "overlap", (Member("w", 0, (0,), "in", 1, (1,)), Member("w", 0, (0, 1), "out", 1, (1,))))
    with pytest.raises(Exception, match="overlap"):
        GroupIncidence([bad], params)


def test_grouped_transposed_conv_writes_blocks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    x = torch.randn(2, 2, 2, 2)
    s = find_symmetries(m, x)
    # ConvTranspose2d(4, 6, groups=2): weight (4, 3, 2, 2); output channel c = 3 g + l is written by the
    # block weight[2g:2g+2, l]; its input channel k is read by weight[k] (all of group g's outputs).
    g = s["rescale:2[2:4;1]"]  # named by its block: rows 2:4, column 1
    assert Member("2.weight", 0, (2, 3), "in", 1, (1,)) in g.members
    assert Member("2.bias", 0, (4,), "in") in g.members
    assert s["rescale:0[3]"].members[-1] == Member("2.weight", 0, (3,), "out")
    assert counts(s) == (6 * 16 + 1, 0, 4 + 6)
    certify_groups(m, s, x)


# ---- activations --------------------------------------------------------------------------------
@pytest.mark.parametrize("act, homogeneous", [
    (nn.ReLU(), True), (nn.LeakyReLU(0.2), True), (nn.Identity(), True), (nn.GELU(), False), (nn.SiLU(), False),
    (nn.Hardswish(), False), (nn.Tanh(), False), (nn.Sigmoid(), False), (nn.ReLU6(), False), (nn.ELU(), False),
    (nn.Softplus(), False), (nn.Mish(), False),
])
def test_rescale_only_through_positively_homogeneous_activations(act, homogeneous):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 2))
    x = torch.randn(4, 3) * 10  # large enough to reach ReLU6's clipping
    s = find_symmetries(m, x)
    assert counts(s)[2] == (5 if homogeneous else 0)
    certify_groups(m, s, x)
    if not homogeneous:  # the symmetry really is absent: scaling a hidden neuron changes the loss
        sym = Symmetry("rescale", "r", (Member("0.weight", 0, (0,), "in"), Member("0.bias", 0, (0,), "in"),
                                        Member("2.weight", 1, (0,), "out")))
        with pytest.raises(AssertionError, match="changes the loss"):
            certify_groups(m, [sym], x)


# ---- layer scale, weight norm, frozen parameters, buffers ------------------------------------------
class ViewedLayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.gamma.view(-1, 1, 1) * F.relu(self.conv(x))  # layer scale through a reshape
        return self.fc(F.relu(y).mean((2, 3)))


def test_reshaped_layer_scale_reads_and_writes():
    torch.manual_seed(2)
    m = ViewedLayerScale()
    x = torch.randn(2, 3, 5, 5)
    s = find_symmetries(m, x)
    # conv channel c -> gamma[c] (reader, A2); gamma[c] -> ReLU -> mean -> fc column c (A2 of gamma's group)
    assert counts(s) == (7, 0, 12)
    assert set(s["rescale:conv[2]"].members) == {Member("conv.weight", 0, (2,), "in"),
                                                 Member("conv.bias", 0, (2,), "in"), Member("gamma", 0, (2,), "out")}
    assert set(s["rescale:gamma[2]"].members) == {Member("gamma", 0, (2,), "in"), Member("fc.weight", 1, (2,), "out")}
    assert any("through aten.view" in step for step in s["rescale:conv[2]"].chain)
    certify_groups(m, s, x)


def test_weight_norm_direction_is_scale_invariant_and_magnitude_writes():
    torch.manual_seed(3)
    m = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(3, 4)
    s = find_symmetries(m, x)
    v, g = "0.parametrizations.weight.original1", "0.parametrizations.weight.original0"
    # w = g v / |v| row-wise: each row v[c] is scale-invariant (5 groups); g[c], bias[c] write neuron c, read
    # by the next Linear's column c through ReLU (5 rescale groups); translation 5 + 1.
    assert counts(s) == (6, 5, 5)
    assert s[f"scale:{v}[1]"].members == (Member(v, 0, (1,)),)
    assert set(s[f"rescale:{g}[1]"].members) == {Member(g, 0, (1,), "in"), Member("0.bias", 0, (1,), "in"),
                                                 Member("2.weight", 1, (1,), "out")}
    certify_groups(m, s, x)


def test_frozen_parameters_are_excluded_and_reported():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    m[2].weight.requires_grad_(False)
    x = torch.randn(3, 3)
    s = find_symmetries(m, x)
    assert s.meta["frozen"] == ["2.weight"]
    assert "2.weight" not in {mm.param for g in s for mm in g.members}
    # the frozen Linear can neither absorb its inputs' scale nor write a scalable output: only the
    # translation of the last layer (4 columns + bias) is left
    assert counts(s) == (5, 0, 0)
    assert s.meta["blocked_ops"]["aten.linear (frozen weight)"] == 1


class BufferModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.register_buffer("gain", torch.tensor([1.0, 2.0, 0.5, 3.0]))

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * self.gain)


def test_buffers_are_constants():
    torch.manual_seed(5)
    m = BufferModel()
    x = torch.randn(3, 3)
    s = find_symmetries(m, x)
    assert counts(s) == (5, 0, 4)  # a buffer factor is a constant: homogeneous, the rescale survives
    assert "gain" not in {mm.param for g in s for mm in g.members}
    certify_groups(m, s, x)


# ---- explain ----------------------------------------------------------------------------------
def test_chains_explain_residual_and_concat_groups():
    import torchvision

    torch.manual_seed(6)
    s = find_symmetries(torchvision.models.resnet18(num_classes=4), torch.randn(2, 3, 32, 32))
    text = s["rescale:bn1[5]"].details()  # the stem's bn1 and every layer1 bn2 write stream channel 5
    assert "aten.add" in text and "sums two branches" in text  # the residual add ties the writers
    assert "reads channel 5" in text and "writes channel 5" in text

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 4, 1), nn.Conv2d(7, 2, 1)

        def forward(self, x):
            return self.c(F.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))

    m = Cat()
    x = torch.randn(2, 2, 3, 3)
    s = find_symmetries(m, x)
    text = s["rescale:b[1]"].details()
    assert "b: aten.conv2d writes channel 1" in text and "c: aten.conv2d reads channel 4" in text
    certify_groups(m, s, x)
