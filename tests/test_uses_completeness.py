"""Completeness: the null space of the output Jacobian against the span of the detected generators.

Hand counts (n = directions that leave the log-softmax outputs unchanged at a generic point, large batch):

- ReLU MLP 4-6-5-3: one rescale direction per hidden unit (6 + 5) and the softmax translations of the head
  (one per input column, 5, plus its bias, 1): n = 17.
- BN MLP 4-6-5-3, Linear(bias=False) before each BatchNorm: scale (6 + 5), rescale through the BN affine
  (6 + 5), translations (5 + 1): n = 28. With biases before BN, each bias entry is also free (BN subtracts the
  batch mean): n = 28 + 11, directions the detector does not report (it finds translations only behind a softmax).
- conv net Conv(2->3)-ReLU-MaxPool-Conv(3->4)-ReLU-GlobalAvgPool-Linear(4->5): rescale 3 + 4, translations
  4 + 1: n = 12.
- two linear layers 5 -> k=3 -> 4 with nothing between: the hidden layer's affine group acts (h -> M h + v,
  W2 -> W2 M^-1, b2 -> b2 - W2 M^-1 v: k^2 + k directions) and the head's translations (k + 1): n = (k + 1)^2
  = 16; the detector's k one-parameter rescale groups span only the diagonal of GL(k): found = k + k + 1 = 7.

Generic point: biases feeding a ReLU sit at a random quantile of their unit's pre-activation
(uses_support.quantile_biases), so no unit is dead or always active on the batch and no two units of a layer
share their active set (each of these adds directions that are properties of the point, not symmetries).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import neural_mechanics as nm
from neural_mechanics.symmetry.groups import Member, Symmetry
from uses_support import generic, quantile_biases

torch.set_num_threads(1)


def _mlp(bn: bool, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    if bn:
        return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5, bias=bias),
                             nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _run(model: nn.Module, x: torch.Tensor) -> nm.Completeness:
    sym = nm.find_symmetries(model, x)
    assert nm.certify(model, sym, x).ok
    result = nm.completeness(model, x, sym)
    assert result.reliable and not result.outside_null, result.summary()
    return result


def test_relu_mlp_found_all_17():
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(1))
    model = quantile_biases(_mlp(bn=False), x)
    assert generic(model, x)  # the generic-point precondition
    c = _run(model, x)
    assert (c.found, c.total) == (17, 17)
    assert c.found_by_layer == {"0": 6, "2": 5, "4": 6}  # reported under the writer's layer; head: 5 cols + bias


def _entries(param: str, shape: tuple[int, ...], fixed: dict[int, int]) -> list[Symmetry]:
    """One hand-written 'translation' group per entry of `param` (generator: that unit vector) with the given dims
    fixed ({0: 0} = row 0): directions named by hand. Adding them to the detected set closes the gap exactly when
    they are the missing directions."""
    out = []
    for flat in range(int(torch.tensor(shape).prod())):
        idx = list(torch.unravel_index(torch.tensor(flat), shape))
        if any(int(idx[d]) != v for d, v in fixed.items()):
            continue
        members = (Member(param, 0, (int(idx[0]),), sub_dim=1, sub_index=(int(idx[1]),)),) if len(shape) == 2 \
            else (Member(param, 0, (int(idx[0]),)),)
        out.append(Symmetry("translation", f"e:{param}{[int(i) for i in idx]}", members))
    return out


def test_relu_mlp_with_a_dead_unit_shows_the_extra_directions():
    # a hidden unit inactive on every sample: its incoming row + bias (4 + 1) and outgoing column (5) are free,
    # minus the one rescale direction already found among them: 17 + 9 = 26. Naming those 10 coordinates by hand
    # explains every direction.
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(1))
    model = quantile_biases(_mlp(bn=False), x)
    with torch.no_grad():
        model[0].bias[0] = -100.0
    sym = list(nm.find_symmetries(model, x))
    c = nm.completeness(model, x, sym)
    assert (c.found, c.total) == (17, 26)
    assert sum(c.unexplained_by_parameter.values()) == pytest.approx(9, abs=1e-8)
    dead = _entries("0.weight", (6, 4), {0: 0}) + _entries("0.bias", (6,), {0: 0})
    dead += _entries("2.weight", (5, 6), {1: 0})
    assert len(dead) == 10
    c = nm.completeness(model, x, sym + dead)
    assert (c.found, c.total) == (26, 26) and not c.outside_null


def test_bn_mlp_found_all_28():
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(2))
    c = _run(_mlp(bn=True, bias=False), x)
    assert (c.found, c.total) == (28, 28) and not c.unexplained_by_parameter


def test_bias_before_batchnorm_is_a_symmetry_the_detector_misses():
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(2))
    model = _mlp(bn=True, bias=True)
    c = _run(model, x)
    assert c.total == 28 + 6 + 5
    sym = list(nm.find_symmetries(model, x))
    biases = _entries("0.bias", (6,), {}) + _entries("3.bias", (5,), {})
    reported = [s for s in sym if s.kind == "translation"]
    missed = [b for b in biases if not any(set(b.members) <= set(s.members) for s in reported)]
    assert c.found == c.total - len(missed)
    # the unexplained directions are exactly the bias entries: naming them closes the gap
    closed = nm.completeness(model, x, sym + biases)
    assert (closed.found, closed.total) == (c.total, c.total) and not closed.outside_null
    # brute force: the outputs' gradient w.r.t. a bias before train-mode BN vanishes identically (autograd)
    out = torch.log_softmax(model.double()(x.double()), dim=1)
    (g,) = torch.autograd.grad(out[:, 0].sum() + out[:, 1].square().sum(), [model[0].bias])
    assert float(g.abs().max()) < 1e-12


def test_convnet_found_all_12():
    x = torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    quantile_biases(model, x)
    c = _run(model, x)
    assert (c.found, c.total) == (12, 12)


def test_two_linear_layers_have_more_than_the_detector_spans():
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4))
    c = _run(model, x)
    k = 3
    assert (c.found, c.total) == (2 * k + 1, (k + 1) ** 2)
    assert sum(c.unexplained_by_parameter.values()) == pytest.approx(k * k, abs=1e-8)
    assert c.unexplained_by_parameter.keys() == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert "found 7 of 16" in c.summary()
    # brute force: the rank of the full autograd Jacobian of the log-softmax outputs
    params = dict(model.double().named_parameters())

    def f(*ps):
        out = torch.func.functional_call(model, dict(zip(params, ps, strict=True)), (x.double(),))
        return torch.log_softmax(out, dim=1).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in params.values()))
    full = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    assert full.shape[1] - int(torch.linalg.matrix_rank(full, rtol=1e-9)) == c.total


def test_a_claimed_group_that_is_no_symmetry_is_reported():
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(2))
    model = _mlp(bn=True, bias=False)
    sym = list(nm.find_symmetries(model, x))
    bogus = Symmetry("scale", "bogus", (Member("6.weight", 0, (0,)),))  # one head row: changes the logits
    c = nm.completeness(model, x, [*sym, bogus])
    assert c.outside_null == ["bogus"] and (c.found, c.total) == (28, 28)


def test_clear_errors():
    model = _mlp(bn=True, bias=False)
    sym = nm.find_symmetries(model, torch.randn(8, 4))
    with pytest.raises(nm.SymmetryUseError, match="independent outputs"):
        nm.completeness(model, torch.randn(8, 4), sym)
    with pytest.raises(nm.SymmetryUseError, match="max_params"):
        nm.completeness(model, torch.randn(128, 4), sym, max_params=10)
    with pytest.raises(nm.SymmetryUseError, match="unknown loss"):
        nm.completeness(model, torch.randn(128, 4), sym, loss="hinge")


ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh}
HOMOGENEOUS = {"relu", "leaky"}


def _drawn_mlp(layers, n_in: int, n_out: int, seed: int) -> tuple[nn.Sequential, int, list[Symmetry]]:
    """The drawn MLP at the point `seed`, its hand count n and the bias entries before BN (hand-named groups)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    width, scale, rescale = n_in, 0, 0
    missed: list[Symmetry] = []
    for w, bn, act, bias in layers:
        has_bias = bias or not bn  # without BN the bias sets the unit's kink (the generic point needs it)
        mods.append(nn.Linear(width, w, bias=has_bias))
        if bn:
            mods.append(nn.BatchNorm1d(w))
            scale += w  # the Linear's rows behind train-mode BN
            if has_bias:
                missed += _entries(f"{len(mods) - 2}.bias", (w,), {})  # BN subtracts the batch mean
        mods.append(ACTS[act]())
        rescale += w if act in HOMOGENEOUS else 0  # writer (Linear or BN affine) -> act -> next columns
        width = w
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods).double(), (width + 1) + scale + rescale + len(missed), missed


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(st.tuples(st.integers(4, 5), st.booleans(), st.sampled_from(sorted(ACTS)), st.booleans()),
                       min_size=1, max_size=3),
       n_in=st.integers(3, 4), n_out=st.integers(3, 4), seed=st.integers(0, 2**16))
def test_random_relu_bn_mlps_are_complete(layers, n_in, n_out, seed):
    # The completeness oracle on drawn MLPs: every direction that leaves the outputs unchanged at every parameter
    # point is a detected group, except the biases before train-mode BatchNorm (free entries the detector does not
    # report), named by hand. Two kinds of extra directions are properties of a point, not of the architecture,
    # and are kept out as follows:
    # - degenerate points (a dead or always-active unit, two units with nearly the same active set): quantile biases
    #   and `generic`;
    # - hidden symmetries (Grigsby, Lindsey & Rolnick, "Hidden symmetries of ReLU networks", ICML 2023): ReLU nets
    #   have extra output-preserving directions on sets of parameters of positive measure, more often the narrower
    #   the layers, the smaller the input and the output (measured here: ~50% of random points of a 2-4-4-2 BN
    #   net, a few % with 2-d inputs and widths 3-5; none in 150 draws of the ranges below, two classes excluded:
    #   the log-softmax of two logits is one scalar function). A symmetry holds at every point, so the
    #   architecture's count is the minimum over points: up to three generic random points are tried. (A unit
    #   whose active samples see one input unit always off leaves a free weight too: another point.)
    totals = []
    for k in range(8):  # up to three generic points (of at most eight drawn)
        model, expected, missed = _drawn_mlp(layers, n_in, n_out, seed + k)
        x = torch.randn(128, n_in, generator=torch.Generator().manual_seed(seed + k), dtype=torch.float64)
        quantile_biases(model, x, seed + k)
        if not generic(model, x):
            continue
        sym = list(nm.find_symmetries(model, x))
        c = nm.completeness(model, x, sym)
        assert c.reliable and not c.outside_null
        assert c.found == expected - len(missed) and c.total >= expected, c.summary()
        if missed:  # and those are exactly the bias entries
            assert nm.completeness(model, x, sym + missed).found == expected
        totals.append(c.total)
        if c.total == expected or len(totals) == 3:
            break
    assume(totals)
    assert min(totals) == expected
