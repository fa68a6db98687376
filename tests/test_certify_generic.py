"""Certification that cannot be fooled: generic points and baselines (symmetry/certify.py, generic_point.py).

A wrong group hidden in a branch that the model's own parameters switch off (a zero-initialised residual branch,
`zero_init_residual`) or damp (a layer scale of 1e-6) changes the loss by 0 or by ~1e-7 there, which an absolute
tolerance of 1e-6 let through. At the generic point every parameter is perturbed (zero ones at the floor), and
each change is judged against a baseline (a random move of the same coordinates by the same distance), so the
wrong group fails while every real group passes. The groups are derived by hand in each test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import neural_mechanics as nm
from neural_mechanics.symmetry.certify import MIN_BASELINE, ROUNDING, random_move, within
from neural_mechanics.symmetry.generic_point import FLOOR_FRACTION, PERTURBATION, generic_point
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet

torch.set_num_threads(1)
X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


class Branch(nn.Module):
    """h = relu(inp x); out = head(h + r) with a residual branch r = b(relu(a h)), zero-initialised (b = 0), or
    r = gamma * b(relu(a h)) with a layer scale gamma = `layer_scale` per channel."""

    def __init__(self, layer_scale: float | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.gamma = None if layer_scale is None else nn.Parameter(torch.full((8,), layer_scale))
        if layer_scale is None:
            nn.init.zeros_(self.b.weight)
            nn.init.zeros_(self.b.bias)

    def forward(self, x):
        h = F.relu(self.inp(x))
        r = self.b(F.relu(self.a(h)))
        return self.head(h + (r if self.gamma is None else self.gamma * r))


def branch_groups(layer_scale: bool) -> SymmetrySet:
    """By hand. Branch unit c: a row c + bias c (A1) against b column c (A2). Stream channel c: written by inp row c
    + bias c and (through the branch) by b row c + bias c, or by gamma[c] under a layer scale; read by a column c and
    head column c. Layer scale: gamma[c] reads b's channel c, so b row c + bias c (A1) against gamma[c] (A2).
    Softmax: head columns and bias (9 translations)."""
    S = []
    for c in range(8):
        S.append(Symmetry("rescale", f"unit{c}", (Member("a.weight", 0, (c,), "in"), Member("a.bias", 0, (c,), "in"),
                                                  Member("b.weight", 1, (c,), "out"))))
        writer = (Member("gamma", 0, (c,), "in"),) if layer_scale else (Member("b.weight", 0, (c,), "in"),
                                                                        Member("b.bias", 0, (c,), "in"))
        S.append(Symmetry("rescale", f"stream{c}", (Member("inp.weight", 0, (c,), "in"),
                                                    Member("inp.bias", 0, (c,), "in"), *writer,
                                                    Member("a.weight", 1, (c,), "out"),
                                                    Member("head.weight", 1, (c,), "out"))))
        if layer_scale:
            scaled = (Member("b.weight", 0, (c,), "in"), Member("b.bias", 0, (c,), "in"),
                      Member("gamma", 0, (c,), "out"))
            S.append(Symmetry("rescale", f"scaled{c}", scaled))
        S.append(Symmetry("translation", f"col{c}", (Member("head.weight", 1, (c,)),)))
    S.append(Symmetry("translation", "bias", (Member("head.bias"),)))
    return SymmetrySet(S)


WRONG = Symmetry("rescale", "wrong", (Member("a.weight", 0, (0,), "in"), Member("a.bias", 0, (0,), "in"),
                                      Member("b.weight", 1, (1,), "out")))
"""Branch unit 0's writers paired with the reader of unit 1: not a symmetry (b column 1 reads unit 1)."""


@pytest.mark.parametrize("layer_scale", [None, 1e-6], ids=["zero-branch", "layer-scale-1e-6"])
def test_detection_finds_the_hand_derived_groups(layer_scale):
    found = nm.find_symmetries(Branch(layer_scale), X)
    want = branch_groups(layer_scale is not None)
    assert found.counts() == want.counts() == {"translation": 9, "scale": 0, "rescale": 24 if layer_scale else 16}
    assert {frozenset(g.members) for g in found} == {frozenset(g.members) for g in want}


@pytest.mark.parametrize("layer_scale", [None, 1e-6], ids=["zero-branch", "layer-scale-1e-6"])
def test_a_wrong_group_hidden_in_the_branch_is_rejected_and_real_groups_pass(layer_scale):
    model = Branch(layer_scale)
    rep = nm.certify(model, [*branch_groups(layer_scale is not None), WRONG], X, sample=None)
    by_name = {r.name: r for r in rep.results}
    wrong = by_name.pop("wrong")
    assert not wrong.passed and not rep.ok
    # the baseline is large, and the wrong action does a sizeable fraction of what a random move does
    assert wrong.baseline_loss_change > 1e-5 and wrong.rel_loss_change > 1e-2 * wrong.baseline_loss_change
    assert wrong.rel_output_change > 1e-2 * wrong.baseline_output_change > 0
    assert all(r.passed for r in by_name.values()), rep.summary()
    assert max(r.rel_loss_change for r in by_name.values()) < 1e-13
    assert all(r.baseline_loss_change > 1e3 * max(r.rel_loss_change, ROUNDING) for r in by_name.values()
               if r.conclusive)
    assert sum(not r.conclusive for r in by_name.values()) <= 1  # at most a unit dead for the whole batch
    composed = {r.name: r for r in rep.all_at_once}
    assert not composed["<all>"].passed and not composed["<all rescale>"].passed
    assert composed["<all translation>"].passed
    assert "generic point" in rep.summary() and "FAILED rescale wrong" in rep.summary()
    alone = nm.certify(model, branch_groups(layer_scale is not None), X, sample=None)
    assert alone.ok, alone.summary()


def test_at_the_models_own_point_a_zero_branch_makes_the_test_inconclusive():
    """The old test point: the wrong group changes nothing (exactly 0), and neither does a random move of its
    coordinates; certify says the test had no power instead of vouching for the group."""
    rep = nm.certify(Branch(), [WRONG], X, sample=None, perturbation=0)
    (r,) = rep.results
    assert r.rel_loss_change == 0.0 and r.baseline_loss_change < MIN_BASELINE
    assert r.passed and not r.conclusive and rep.inconclusive()
    assert "inconclusive" in rep.summary() and "no perturbation" in rep.summary()


def test_a_tiny_layer_scale_no_longer_slips_under_an_absolute_tolerance():
    """At the model's own point the 1e-6 layer scale shrinks the wrong group's effect below 1e-6 (what the old
    absolute tolerance let through), but its baseline shrinks with it, so the relative judgement rejects it."""
    rep = nm.certify(Branch(1e-6), [WRONG], X, sample=None, perturbation=0)
    (r,) = rep.results
    assert r.rel_loss_change < 1e-6 and r.rel_output_change < 1e-6  # the old rule: passed
    assert r.conclusive and not r.passed
    assert r.rel_output_change > 0.1 * r.baseline_output_change


def test_a_torchvision_resnet_with_zero_init_residual():
    """resnet18(zero_init_residual=True): every block's last BN weight is 0, so its branch adds 0. Wrong: layer1.0's
    bn1 channel 0 (weight, bias) paired with conv2's input column 1. Right (by hand): bn1 channel c (A1) against
    conv2's input column c (A2), through the ReLU. Only the generic point sees the difference."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).train()
    assert not model.layer1[0].bn2.weight.any()
    # batch 4 at 64x64: layer4's train-mode BatchNorm normalises 16 values per channel (with 2 at 32x32 it normalises
    # two values to -1 and +1 whatever they are, and the loss stops depending on anything before it)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def pair(c: int, d: int, name: str) -> Symmetry:
        return Symmetry("rescale", name, (Member("layer1.0.bn1.weight", 0, (c,), "in"),
                                          Member("layer1.0.bn1.bias", 0, (c,), "in"),
                                          Member("layer1.0.conv2.weight", 1, (d,), "out")))

    groups = [pair(0, 1, "wrong"), pair(0, 0, "right0"), pair(5, 5, "right5")]
    old = nm.certify(model, groups, x, sample=None, perturbation=0)
    assert {r.name for r in old.results if not r.conclusive} == {"wrong", "right0", "right5"}
    rep = nm.certify(model, groups, x, sample=None)
    res = {r.name: r for r in rep.results}
    assert not res["wrong"].passed and res["wrong"].conclusive
    assert res["right0"].passed and res["right5"].passed and res["right0"].conclusive and res["right5"].conclusive
    assert "layer1.0.bn2.weight" in rep.point  # floored: it was all zero


# ---- the rule of the generic point --------------------------------------------------------------------------------


def test_generic_point_perturbs_every_tensor_at_its_own_scale_with_a_floor():
    torch.manual_seed(0)
    params = {"w": torch.randn(400, 300) * 0.05, "ones": torch.ones(1000), "zero": torch.zeros(500, 40),
              "tiny": torch.full((2000,), 1e-6), "ids": torch.arange(3)}
    point = generic_point(params, seed=3)
    rms = {"w": 0.05, "ones": 1.0}
    ref = sorted([float(params["w"].pow(2).mean().sqrt()), 1.0, 1e-6])[1]  # median rms of the non-zero tensors
    assert point.reference_rms == pytest.approx(ref)
    assert point.floored == ["zero", "tiny"]
    for k, t in params.items():
        if k == "ids":
            assert point.params[k] is t  # integer tensors are not parameters of a loss
            continue
        moved = point.params[k] - t
        assert bool((moved != 0).all()), k  # every entry moves, zero-initialised ones included
        want = PERTURBATION * max(rms.get(k, 0.0), FLOOR_FRACTION * ref)
        assert float(moved.std()) == pytest.approx(want, rel=0.1), k
    again = generic_point(params, seed=3)
    assert all(torch.equal(again.params[k], point.params[k]) for k in params)
    assert not torch.equal(generic_point(params, seed=4).params["w"], point.params["w"])
    same = generic_point(params, perturbation=0)
    assert all(same.params[k] is params[k] for k in params) and "no perturbation" in same.describe()


def test_random_move_has_the_actions_support_and_length():
    params = {"a": torch.randn(5, 4, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    g = Symmetry("rescale", "g", (Member("a", 0, (1, 3), "in"), Member("b", 0, (2,), "out")))
    moved = g.act(params, 1.7)
    base = random_move(params, moved, torch.Generator().manual_seed(0))
    d_act = torch.cat([(moved[k] - params[k]).flatten() for k in moved])
    d_rand = torch.cat([(base[k] - params[k]).flatten() for k in moved])
    assert torch.equal(d_act != 0, d_rand != 0)
    assert float(d_rand.norm()) == pytest.approx(float(d_act.norm()), rel=1e-12)
    assert float(torch.dot(d_rand, d_act) / d_act.norm() ** 2) < 0.99  # a different direction


@pytest.mark.parametrize("change,baseline,passed", [
    (1e-16, 1e-3, True), (1e-9, 1e-2, True), (1e-7, 1e-2, False), (1e-13, 1e-20, True), (1e-11, 1e-20, False),
    (math.nan, 1.0, False), (1e-13, math.inf, True), (1e-3, math.inf, False),
])
def test_the_judgement_rule(change, baseline, passed):
    assert within(change, baseline, 1e-6) is passed


def test_certify_refuses_a_bad_perturbation():
    with pytest.raises(nm.NMechError, match="perturbation"):
        nm.certify(Branch(), [WRONG], X, perturbation=-1)
