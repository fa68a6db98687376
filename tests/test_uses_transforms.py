"""Moves along the orbits: act, balance, equalize (DFQ) and the distance up to symmetry.

Every transform must leave loss and outputs unchanged: each test compares the transformed model against the
original with an independent float64 forward pass (uses_support.outputs64) at generic (random) parameters.
Closed forms are checked against brute force: the DFQ two-layer formula written out directly, the best
rescale factor against a dense grid, balance against random moves along the orbit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neural_mechanics as nm
from hand_models import batch, mlp, mlp_groups
from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.uses.alignment import best_rescale_factor
from neural_mechanics.uses.balance import balance_params, balance_with_result, imbalance
from neural_mechanics.uses.equalize import channel_ranges, equalize_params
from neural_mechanics.uses.orbits import Orbits, float64_params
from neural_mechanics.uses.quantize import fold_batchnorm, quantization_error, quantize_tensor
from neural_mechanics.uses.transforms import function_change
from uses_support import same_function

torch.set_num_threads(1)


def chain(depth: int = 4, width: int = 6, seed: int = 0, bn: bool = False) -> nn.Sequential:
    """Linear-[BN]-ReLU x depth, then a 3-way Linear head, in float64: overlapping rescale groups along a chain."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    w = 4
    for _ in range(depth):
        mods += [nn.Linear(w, width), *([nn.BatchNorm1d(width)] if bn else []), nn.ReLU()]
        w = width
    mods.append(nn.Linear(w, 3))
    return nn.Sequential(*mods).double()


def _factors(sym, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return [float(torch.randn((), generator=g)) if s.kind == "translation"
            else math.exp(float(torch.empty(()).uniform_(-1, 1, generator=g))) for s in sym]


def _sq(model: nn.Module) -> float:
    return float(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


# ---- act -------------------------------------------------------------------------------------------------


def test_act_one_group_is_the_reference_action_and_the_set_composes():
    model = mlp().double()
    x, _ = batch()
    sym = list(mlp_groups())
    params = dict(model.named_parameters())
    for g in (sym[0], sym[7], sym[-1]):  # a scale, a rescale and a translation group
        alpha = 1.7 if g.kind != "translation" else -0.4
        moved = dict(nm.act(model, g, alpha).named_parameters())
        ref = g.act({k: v.detach() for k, v in params.items()}, alpha)
        for k, v in moved.items():
            torch.testing.assert_close(v.detach(), ref.get(k, params[k].detach()), rtol=1e-15, atol=0)
    out = nm.act(model, sym, _factors(sym))
    assert out is not model and not torch.equal(out[0].weight, model[0].weight)
    same_function(model, out, x)
    # a mapping moves only the named groups; inplace changes the model itself
    moved = nm.act(model, sym, {sym[7].name: 2.0})
    changed = {k for k, v in moved.named_parameters() if not torch.equal(v, model.get_parameter(k))}
    assert changed == set(sym[7].params) - {"1.bias"}  # the BN bias starts at 0, which scaling keeps
    assert nm.act(model, sym, 1.5, inplace=True) is model


def test_act_rejects_bad_factors():
    model = mlp()
    sym = list(mlp_groups())
    with pytest.raises(nm.SymmetryUseError, match="> 0"):
        nm.act(model, sym[0], -1.0)
    with pytest.raises(nm.SymmetryUseError, match="factors for"):
        nm.act(model, sym, [1.0, 2.0])
    with pytest.raises(nm.SymmetryUseError, match="not in the set"):
        nm.act(model, sym, {"nope": 2.0})
    with pytest.raises(nm.SymmetryUseError, match="does not have"):
        nm.act(model, Symmetry("scale", "x", (Member("nope.weight"),)), 2.0)


# ---- balance ---------------------------------------------------------------------------------------------


def test_one_rescale_group_balances_at_the_closed_form():
    # alpha^2 N1 + N2 / alpha^2 is smallest at alpha^4 = N2 / N1: compare with a dense grid over alpha
    model = chain(depth=1)
    g = next(s for s in nm.find_symmetries(model, torch.randn(8, 4, dtype=torch.float64)) if s.kind == "rescale")
    p = {k: v.detach() for k, v in model.named_parameters()}
    n1 = sum(float((v[g.masks(p)[k] > 0] ** 2).sum()) for k, v in p.items() if k in g.params)
    n2 = sum(float((v[g.masks(p)[k] < 0] ** 2).sum()) for k, v in p.items() if k in g.params)
    grid = torch.logspace(-2, 2, 400_001, dtype=torch.float64)
    best = float(grid[(grid**2 * n1 + n2 / grid**2).argmin()])
    balanced = dict(nm.balance(model, [g]).named_parameters())
    alpha = float((balanced["0.weight"].detach()[g.members[0].index[0]] / p["0.weight"][g.members[0].index[0]]).mean())
    assert alpha == pytest.approx((n2 / n1) ** 0.25, rel=1e-12)
    assert alpha == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("depth", [2, 5])
def test_balance_converges_on_overlapping_chains_and_keeps_the_function(depth):
    model = chain(depth=depth)
    x = torch.randn(32, 4, dtype=torch.float64)
    sym = nm.find_symmetries(model, x)
    assert nm.certify(model, sym, x).ok
    out = nm.balance(model, sym)
    res = imbalance(out, sym)
    assert len(res) == depth * 6 and max(res.values()) <= 1e-10  # the stated convergence criterion
    same_function(model, out, x)
    assert _sq(out) < _sq(model)
    # minimum norm along the orbit: random moves of the rescale groups only increase |theta|^2
    resc = [s for s in sym if s.kind == "rescale"]
    for seed in range(3):
        assert _sq(nm.act(out, resc, _factors(resc, seed))) > _sq(out)
    # inplace and copy semantics
    assert out is not model and nm.balance(model, sym, inplace=True) is model


def test_balance_with_scale_norm_and_bn():
    model = chain(depth=3, bn=True)
    x = torch.randn(32, 4, dtype=torch.float64)
    sym = nm.find_symmetries(model, x)
    params = float64_params(model)
    result = balance_params(params, sym, scale_norm=2.0)
    assert result.converged and result.residual <= 1e-10 and not result.skipped
    for s in sym.filter("scale"):
        norm = math.sqrt(sum(float((params[m.param][m.mask(params[m.param])] ** 2).sum()) for m in s.members))
        assert norm == pytest.approx(2.0, rel=1e-9)
    out = nm.balance(model, sym, scale_norm=2.0)
    assert max(imbalance(out, sym).values()) <= 1e-10
    same_function(model, out, x)


def test_balance_skips_degenerate_groups():
    model = chain(depth=1)
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0  # A2 of the group of hidden unit 0 is all zero: infimum at alpha -> 0
    sym = nm.find_symmetries(model, torch.randn(16, 4, dtype=torch.float64))
    result = balance_params(float64_params(model), sym)
    assert result.converged and result.skipped == ["rescale:0[0]"]


def test_balance_warns_when_it_runs_out_of_sweeps():
    model = chain(depth=5)
    sym = nm.find_symmetries(model, torch.randn(16, 4, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="balance stopped after 2 sweeps"):
        out, result = balance_with_result(model, sym, max_sweeps=2)
    assert not result.converged and result.sweeps == 2 and result.residual > 1e-10
    assert max(imbalance(out, sym).values()) < max(imbalance(model, sym).values())


def test_balance_float32_model_is_balanced_to_float32_rounding():
    model = chain(depth=2).float()
    x = torch.randn(32, 4)
    sym = nm.find_symmetries(model, x)
    out = nm.balance(model, sym)
    assert out[0].weight.dtype == torch.float32
    assert max(imbalance(out, sym).values()) < 1e-5
    assert function_change(model, out, x) < 1e-5


# ---- equalize (DFQ) --------------------------------------------------------------------------------------


def test_equalize_matches_the_dfq_two_layer_formula():
    # Nagel et al. 2019, section 4.1, written out: r1 = per-output-channel range of W1, r2 = per-input-channel
    # range of W2, s = sqrt(r1 r2) / r2; W1 / s, b1 / s, W2 * s
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 7, dtype=torch.float64)[:, None])  # badly spread channels
    w1, b1, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight))
    r1, r2 = w1.abs().amax(1), w2.abs().amax(0)
    s = (r1 * r2).sqrt() / r2
    x = torch.randn(16, 5, dtype=torch.float64)
    sym = nm.find_symmetries(model, x)
    out = nm.equalize(model, sym)
    torch.testing.assert_close(out[0].weight, w1 / s[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(out[0].bias, b1 / s, rtol=1e-12, atol=0)
    torch.testing.assert_close(out[2].weight, w2 * s[None, :], rtol=1e-12, atol=0)
    same_function(model, out, x)
    ranges = channel_ranges(out, sym)
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in ranges.values())


def test_equalize_converges_on_a_chain_and_lowers_int8_error():
    model = chain(depth=4)
    with torch.no_grad():
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            layer.weight.mul_(torch.logspace(-1.5, 1.5, layer.out_features, dtype=torch.float64)[
                torch.randperm(layer.out_features, generator=torch.Generator().manual_seed(i))][:, None])
    x = torch.randn(64, 4, dtype=torch.float64)
    sym = nm.find_symmetries(model, x)
    params = float64_params(model)
    result = equalize_params(params, sym)
    assert result.converged and result.equalized == 4 * 6 and result.residual <= 1e-6
    out = nm.equalize(model, sym)
    same_function(model, out, x)
    for a, b in channel_ranges(out, sym).values():
        assert abs(math.log(a / b)) <= 1e-6
    before, after = quantization_error(model, x), quantization_error(out, x)
    # the quantisation noise on the outputs drops (per-tensor steps no longer swamp the small channels); the
    # Frobenius weight error is no measure of that (it is dominated by the largest entries)
    assert after.output_error < 0.5 * before.output_error


def test_equalize_leaves_groups_without_quantised_weights_on_one_side():
    # train-mode BN: the rescale groups are (BN gamma, beta) -> next columns; gamma and beta are not quantised
    model = chain(depth=2, bn=True)
    sym = nm.find_symmetries(model, torch.randn(16, 4, dtype=torch.float64))
    result = equalize_params(float64_params(model), sym)
    assert result.equalized == 0 and len(result.skipped) == 12


def test_quantize_tensor_and_fold_batchnorm():
    w = torch.tensor([[1.0, -0.5], [0.25, 0.0]])
    step = 1.0 / 127
    assert torch.equal(quantize_tensor(w), torch.round(w / step) * step)
    r = torch.randn(50, 50, generator=torch.Generator().manual_seed(0))
    q = quantize_tensor(r)
    assert len(q.unique()) <= 255 and float((q - r).abs().max()) <= float(r.abs().max()) / 127 / 2 + 1e-7
    torch.manual_seed(0)  # bias-free convs before BN, as in resnets: folding gives them a (trainable) bias
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    x = torch.randn(8, 3, 6, 6)
    net.train()
    net(x * 3 + 1)  # running statistics that are not (0, 1)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(p.requires_grad for p in folded.parameters())
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    sym = nm.find_symmetries(folded, x)
    assert sym.counts()["rescale"] == 4 + 5  # conv rows + bias -> next conv / head columns
    with pytest.raises(nm.SymmetryUseError, match="eval-mode"):
        fold_batchnorm(net.train())


# ---- distance up to symmetry -----------------------------------------------------------------------------


def test_best_rescale_factor_against_a_grid():
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.rand(2, 200, generator=g, dtype=torch.float64) * 3 + 1e-3
    p1, p2 = torch.randn(2, 200, generator=g, dtype=torch.float64)
    alpha = best_rescale_factor(a1, p1, a2, p2)
    grid = torch.logspace(-3, 3, 60_001, dtype=torch.float64)[None]

    def f(al):
        return al**2 * a1[:, None] - 2 * al * p1[:, None] + a2[:, None] / al**2 - 2 * p2[:, None] / al

    best, on_grid = f(alpha[:, None])[:, 0], f(grid).min(1).values
    assert bool((best <= on_grid + 1e-12).all())  # never worse than any grid point (two local minima included)
    assert bool((on_grid - best <= 1e-5 * (a1 + a2)).all())  # and the grid gets there at its resolution


def test_distance_to_a_transformed_copy_is_zero():
    model = mlp().double()
    x, _ = batch()
    sym = nm.find_symmetries(model, x)
    other = nm.act(model, sym, _factors(sym, seed=3))
    al = nm.distance_up_to_symmetry(model, other, sym)
    assert al.plain_distance > 1.0
    assert al.relative < 1e-9 and not al.unaligned
    same_function(model, al.aligned, x)
    for a, b in zip(al.aligned.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_distance_between_independent_models_is_bounded_and_keeps_the_function():
    model = mlp().double()
    x, _ = batch()
    sym = nm.find_symmetries(model, x)
    torch.manual_seed(5)
    other = mlp().double()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    al = nm.distance_up_to_symmetry(model, other, sym)
    assert al.distance <= al.plain_distance
    with torch.no_grad():
        direct = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(al.aligned.parameters(),
                                                                                other.parameters(), strict=True)))
    assert direct == pytest.approx(al.distance, rel=1e-12)
    same_function(model, al.aligned, x)
    # each group alone is at its best factor: no single-group move lowers the distance
    base = al.distance**2
    for g in list(sym)[::5]:
        for f in ((1.01, 0.99) if g.kind != "translation" else (0.01, -0.01)):
            moved = nm.act(al.aligned, g, f)
            with torch.no_grad():
                d2 = sum(float(((a - b) ** 2).sum()) for a, b in zip(moved.parameters(), other.parameters(),
                                                                      strict=True))
            assert d2 >= base * (1 - 1e-9), g.name


def test_distance_rejects_different_architectures():
    with pytest.raises(nm.SymmetryUseError, match=r"different parameters|shape"):
        nm.distance_up_to_symmetry(mlp(), mlp(hidden=5), mlp_groups())


def test_colouring_separates_overlapping_groups():
    model = chain(depth=3)
    sym = [s for s in nm.find_symmetries(model, torch.randn(8, 4, dtype=torch.float64)) if s.kind == "rescale"]
    orbits = Orbits(sym, float64_params(model))
    params = float64_params(model)
    masks = [{k: v != 0 for k, v in s.masks(params).items()} for s in sym]
    assert len(orbits.colors) == 2  # a chain: layers alternate
    for colour in orbits.colors:
        ids = colour.tolist()
        for i in ids:
            for j in ids:
                if i < j:
                    shared = any(bool((masks[i][k] & masks[j][k]).any()) for k in masks[i].keys() & masks[j].keys())
                    assert not shared, (sym[i].name, sym[j].name)
