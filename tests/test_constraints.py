"""Gradient and Hessian constraint checks (nm.check_constraints), each against a brute-force reference.

The models' groups are derived by hand (docs/theory.md section 1), so these tests do not depend on the
detector; the last tests run the checks on the detector's output.
"""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

import neural_mechanics as nm
from hand_models import batch, convnet, convnet_groups, mlp, mlp_groups
from neural_mechanics import constraints, geometry
from neural_mechanics.constraints import GRAD_FLOOR, check_constraints
from neural_mechanics.constraints.hessian import Hessian, HessianProbe
from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry import incidence, utils
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.utils import working_copy

torch.set_num_threads(1)


# ---- models with hand-derived groups (tests/hand_models.py) and groups that are not symmetries ----------


def bogus_groups():
    """Groups of the mlp that are NOT symmetries (residuals of order one)."""
    return [
        Symmetry("scale", "bogus.scale.3.0", (Member("3.weight", 0, (0,)), Member("3.bias", 0, (0,)))),
        Symmetry("translation", "bogus.translation.3.bias", (Member("3.bias"),)),
        Symmetry("rescale", "bogus.rescale.0.1",
                 (Member("0.weight", 0, (1,), "in"), Member("3.weight", 1, (2,), "out"))),
    ]


CASES = {"mlp": (mlp, mlp_groups), "conv": (convnet, convnet_groups)}


# ---- brute-force references ----------------------------------------------------------------------


def reference_loss_fn(model, x, y):
    """theta -> loss on a float64 working copy with negligible eps (same as the check), flat vector."""
    work, _ = working_copy(model)
    names = [n for n, _ in work.named_parameters()]
    shapes = [p.shape for _, p in work.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in work.named_parameters()])
    buffers = dict(work.named_buffers())

    def unflat(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            out[n] = flat[i:i + k].reshape(s)
            i += k
        return out

    def f(flat):
        return F.cross_entropy(torch.func.functional_call(work, {**unflat(flat), **buffers}, (x.double(),)), y)

    return f, theta, unflat, names


def flat_of(d, names, like):
    return torch.cat([d[n].reshape(-1) if n in d else torch.zeros_like(like[n]).reshape(-1) for n in names])


# ---- tests ---------------------------------------------------------------------------------------


def _random_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 4, 3, generator=g, dtype=torch.float64),
            "b": torch.randn(5, generator=g, dtype=torch.float64),
            "c": torch.randn(4, 5, generator=g, dtype=torch.float64)}


def _tricky_groups():
    return [
        Symmetry("scale", "s0", (Member("a", 0, (1,)), Member("b", 0, (1,)))),
        Symmetry("scale", "dup", (Member("a", 0, (2, 2, 3)), Member("a", 0, (3,)))),  # duplicates count once
        Symmetry("rescale", "r",
                 (Member("a", 1, (0, 2), "in"), Member("c", 0, (0,), "out"), Member("b", 0, (4,), "in"))),
        Symmetry("translation", "whole", (Member("c"),)),
        Symmetry("translation", "whole+slice", (Member("b"), Member("b", 0, (2,)))),  # slice inside whole
        Symmetry("rescale", "mixed-dims", (Member("c", 0, (1,), "in"), Member("c", 1, (3,), "in"),
                                           Member("a", 2, (1,), "out"))),  # dense fallback, overlap at c[1,3]
        Symmetry("scale", "neg-dim", (Member("a", -1, (0,)),)),
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incidence_reduce_and_expand_match_dense_masks(seed):
    params = _random_params(seed)
    groups = _tricky_groups()
    inc = GroupIncidence(groups, params)
    g = torch.Generator().manual_seed(10 + seed)
    f = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    coef = torch.randn(len(groups), generator=g, dtype=torch.float64)
    masks = [s.masks(params) for s in groups]
    for signed in (True, False):
        want = torch.stack([sum(((m if signed else m.abs()) * f[k]).sum() for k, m in ms.items()) for ms in masks])
        assert torch.allclose(inc.reduce(f, signed=signed), want, rtol=1e-12, atol=1e-12)
        got = inc.expand(coef, signed=signed)
        for k, p in params.items():
            ref = sum((coef[i] * (ms[k] if signed else ms[k].abs()) for i, ms in enumerate(masks) if k in ms),
                      torch.zeros_like(p))
            assert torch.allclose(got.get(k, torch.zeros_like(p)), ref, rtol=1e-12, atol=1e-12)
    sizes = torch.tensor([float(sum(m.abs().sum() for m in ms.values())) for ms in masks], dtype=torch.float64)
    assert torch.equal(inc.sizes(), sizes)


def test_incidence_rejects_bad_groups():
    params = _random_params()
    with pytest.raises(NMechError, match="does not have"):
        GroupIncidence([Symmetry("scale", "x", (Member("nope"),))], params)
    with pytest.raises(NMechError, match="overlap"):
        GroupIncidence([Symmetry("rescale", "x", (Member("a", 0, (1,), "in"), Member("a", 0, (1,), "out")))], params)


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_constraints_hold_on_hand_derived_groups(case):
    make, groups = CASES[case]
    model = make()
    rep = check_constraints(model, F.cross_entropy, batch(case), groups())
    df = rep.to_frame()
    assert rep.ok(), rep.summary()
    assert len(df) == len(groups())
    # the targets, with lots of margin: float64 rounding vs an order-one random baseline
    assert df.grad_rel.max() < 1e-12
    assert df.hess_rel.max() < 1e-10
    assert df.grad_rel_random.median() > 1e-2
    assert df.hess_rel_random.min() > 1e-2
    assert set(df.kind) == {"scale", "rescale", "translation"}
    text = rep.summary()
    assert "all constraints hold" in text and "eps" in text


def test_gradient_statistic_matches_autograd():
    model = mlp()
    x, y = batch()
    groups = list(mlp_groups()) + bogus_groups()
    rep = check_constraints(model, F.cross_entropy, (x, y), groups, hessian=False)
    f, theta, unflat, _names = reference_loss_fn(model, x, y)
    g = unflat(torch.func.grad(f)(theta))
    th = unflat(theta)
    touched = {m.param for s in groups for m in s.members}
    rms = math.sqrt(sum(float(g[k].pow(2).sum()) for k in touched) / sum(g[k].numel() for k in touched))
    for s, row in zip(groups, rep.groups, strict=True):
        xi = s.generator(th)
        masks = s.masks(th)
        dot = sum((g[k] * v).sum() for k, v in xi.items())
        g_a = math.sqrt(sum(float((g[k] * m.abs()).pow(2).sum()) for k, m in masks.items()))
        size = sum(float(m.abs().sum()) for m in masks.values())
        xi_n = math.sqrt(sum(float(v.pow(2).sum()) for v in xi.values()))
        want = float(dot) / (max(g_a, GRAD_FLOOR * rms * math.sqrt(size)) * xi_n)
        assert row.grad_cos == pytest.approx(want, rel=1e-9, abs=1e-14), s.name
        assert row.grad_rel == pytest.approx(abs(row.grad_cos))
    bad = {r.name for r in rep.violations()}
    assert bad == {s.name for s in bogus_groups()}
    assert all(math.isnan(r.hess_rel) for r in rep.groups)


def test_exact_hessian_residuals_match_dense_hessian():
    model = mlp(hidden=3, hidden2=3)
    x, y = batch(n=8)
    groups = list(mlp_groups(3, 3)) + bogus_groups()[:2]
    rep = check_constraints(model, F.cross_entropy, (x, y), groups, hess_mode="exact")
    f, theta, unflat, names = reference_loss_fn(model, x, y)
    # torch.autograd.functional.hessian (reverse over reverse): torch.func.hessian (vmap of forward mode)
    # returns a visibly asymmetric, wrong Hessian for train-mode BatchNorm in torch 2.14
    H = torch.autograd.functional.hessian(f, theta)
    g = torch.func.grad(f)(theta)
    th = unflat(theta)
    assert torch.allclose(H, H.T, atol=1e-12)
    for s, row in zip(groups, rep.groups, strict=True):
        xi = flat_of(s.generator(th), names, th)
        d = flat_of(s.masks(th), names, th)
        jg = d * g if s.kind != "translation" else torch.zeros_like(g)  # (d xi / d theta)^T g
        r = H @ xi + jg
        assert row.hess_exact and row.hess_block == 1
        assert row.hess_Hxi == pytest.approx(float((H @ xi).norm()), rel=1e-9, abs=1e-15), s.name
        assert row.hess_Jg == pytest.approx(float(jg.norm()), rel=1e-9, abs=1e-15), s.name
        assert row.hess_r == pytest.approx(float(r.norm()), rel=1e-7, abs=1e-13), s.name
        assert row.hess_rel == pytest.approx(row.hess_r / (row.hess_Hu + row.hess_Jg), rel=1e-12)
        if s.name.startswith("bogus"):
            assert row.hess_rel > 1e-3
        else:
            assert row.hess_rel < 1e-12
            assert float(r.norm()) < 1e-13


def test_probe_residual_is_signed_sum_of_per_group_residuals():
    """The probe design rests on R(s) = sum_i s_i r_i; check it against one HVP per group."""
    model = mlp()
    x, y = batch()
    groups = list(mlp_groups()) + bogus_groups()  # overlapping groups, non-zero residuals
    work, _ = working_copy(model)
    hes = Hessian(work, lambda out: F.cross_entropy(out, y), (x.double(),), need_hvp=True)
    theta, g = hes.params, hes.grad
    inc = GroupIncidence(groups, theta)
    z = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in theta.items()}
    probe = HessianProbe(hes, inc, z, torch.ones(len(groups), dtype=torch.float64))
    f, flat_theta, _unflat, names = reference_loss_fn(model, x, y)
    per_group = []
    for s in groups:  # brute force: one autograd HVP per group, dense generator and masks
        xi = flat_of(s.generator(theta), names, theta)
        d = flat_of(s.masks(theta), names, theta)
        hxi = torch.autograd.functional.hvp(f, flat_theta, xi)[1]
        per_group.append(hxi + (d * flat_of(g, names, theta) if s.kind != "translation" else 0))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        signs = torch.randint(0, 2, (len(groups),), generator=gen).double() * 2 - 1
        got = flat_of(probe.residual(signs), names, theta)
        want = sum(si * ri for si, ri in zip(signs, per_group, strict=True))
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_bisection_localises_a_single_bad_group_and_agrees_with_exact_mode():
    model = mlp(hidden=24, hidden2=20)
    x, y = batch(n=32)
    groups = list(mlp_groups(24, 20))
    groups.insert(30, bogus_groups()[0])
    probe = check_constraints(model, F.cross_entropy, (x, y), groups, n_probes=4)
    exact = check_constraints(model, F.cross_entropy, (x, y), groups, hess_mode="exact")
    assert [r.name for r in probe.violations()] == ["bogus.scale.3.0"]
    assert [r.name for r in exact.violations()] == ["bogus.scale.3.0"]
    bad_p = next(r for r in probe.groups if r.name == "bogus.scale.3.0")
    bad_e = next(r for r in exact.groups if r.name == "bogus.scale.3.0")
    assert bad_p.hess_exact and bad_p.hess_rel == pytest.approx(bad_e.hess_r / (bad_e.hess_Hu + bad_e.hess_Jg),
                                                                rel=0.5)  # u differs: same z, other draws
    assert bad_p.hess_r == pytest.approx(bad_e.hess_r, rel=1e-9)
    assert probe.n_hvps < exact.n_hvps
    # probed blocks carry an upper-bound estimate that is still tiny
    blocks = [r for r in probe.groups if not r.hess_exact]
    assert blocks and max(r.hess_rel for r in blocks) < 1e-10


def test_eval_mode_batchnorm_warns_and_breaks_scale_constraints():
    model = mlp()
    x, y = batch()
    model.train()
    model(torch.randn(32, 4) * 3 + 1)  # non-trivial running statistics
    model.eval()
    with pytest.warns(UserWarning, match="eval mode"):
        rep = check_constraints(model, F.cross_entropy, (x, y), mlp_groups())
    bad = {r.name for r in rep.violations()}
    assert bad == {s.name for s in mlp_groups() if s.kind == "scale"}
    assert any("eval mode" in n for n in rep.notes)
    assert not rep.ok()
    assert "violate" in rep.summary()


def test_real_batchnorm_eps_breaks_scale_symmetry_slightly():
    model = mlp()
    x, y = batch()
    negligible = check_constraints(model, F.cross_entropy, (x, y), mlp_groups(), hessian=False).to_frame()
    real = check_constraints(model, F.cross_entropy, (x, y), mlp_groups(), hessian=False, norm_eps=None).to_frame()
    scale = real.kind == "scale"
    assert negligible[scale].grad_rel.max() < 1e-13
    assert 1e-9 < real[scale].grad_rel.max() < 1e-2  # ~ eps / var with eps = 1e-5
    assert real[~scale].grad_rel.max() < 1e-12  # rescale and translation do not care about eps


def test_dropout_uses_one_mask_for_gradient_and_hvps():
    model = mlp(dropout=True)
    rep = check_constraints(model, F.cross_entropy, batch(), mlp_groups())
    assert rep.ok(), rep.summary()


def test_model_is_left_exactly_as_it_was():
    model = mlp()
    model.train()
    model(torch.randn(8, 4))  # running stats and num_batches_tracked moved
    model[4].eval()  # a mix of modes
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    check_constraints(model, F.cross_entropy, batch(), mlp_groups())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert model[1].eps == 1e-5
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_inputs_raise_errors_that_say_what_to_do():
    with pytest.raises(NMechError, match="pair"):
        check_constraints(mlp(), F.cross_entropy, batch()[0], mlp_groups())
    with pytest.raises(NMechError, match="n_probes"):
        check_constraints(mlp(), F.cross_entropy, batch(), mlp_groups(), n_probes=0)
    with pytest.raises(NMechError, match="find_symmetries"):
        check_constraints(mlp(), F.cross_entropy, batch(), [Symmetry("scale", "x", (Member("9.weight"),))])


def test_empty_symmetry_set():
    rep = check_constraints(mlp(), F.cross_entropy, batch(), SymmetrySet())
    assert rep.ok() and rep.groups == [] and len(rep.to_frame()) == 0


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_constraints_hold_on_detected_groups(case):
    make, _groups = CASES[case]
    model = make()
    x, y = batch(case)
    found = find_symmetries(model, x)
    assert len(found) > 0
    rep = check_constraints(model, F.cross_entropy, (x, y), found)
    assert rep.ok(), rep.summary()


def test_attention_model_key_bias_and_hessian():
    """A transformer layer (scaled_dot_product_attention): the HVPs run (the fused attention kernels have no double
    backward, the math kernel has), and the key-bias groups, whose gradient vanishes to rounding, pass the gradient
    constraint instead of showing the +-1 cosine of a one-element group's rounding noise."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0,
                                             norm_first=True)
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(5 * 8, 3))
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    found = find_symmetries(model, x)
    key_bias = [s for s in found if s.kind == "translation" and s.members[0].param.endswith("in_proj_bias")]
    assert len(key_bias) == 8
    rep = check_constraints(model, F.cross_entropy, (x, y), found)
    assert rep.n_hvps > 0 and rep.ok(), rep.summary()
    rows = {r.name: r for r in rep.groups}
    f, theta, unflat, _names = reference_loss_fn(model, x, y)
    g = unflat(torch.func.grad(f)(theta))["0.self_attn.in_proj_bias"]
    assert float(g[8:16].abs().max()) < 1e-12 * float(g.abs().max())  # the key bias's gradient vanishes ...
    assert all(rows[s.name].grad_rel < 1e-6 for s in key_bias)  # ... and the check says so


def test_geometry_is_a_deprecated_alias_of_the_moved_names():
    """`neural_mechanics.geometry` (the module before constraints/ and symmetry/utils.py) still resolves every public
    name it had, to the very object at its new place, with a DeprecationWarning naming that place."""
    moved = {"check_constraints": constraints, "ConstraintReport": constraints, "GroupConstraint": constraints,
             "GRAD_FLOOR": constraints, "working_copy": utils, "as_args": utils, "cast_inputs": utils,
             "model_device": utils, "fixed_rng": utils, "eval_mode_batchnorms": utils, "parameter_dict": utils,
             "NEGLIGIBLE_EPS": utils, "NORM_TYPES": utils, "Inputs": utils, "GroupIncidence": incidence}
    for name, module in moved.items():
        with pytest.warns(DeprecationWarning, match=f"import {name} from neural_mechanics"):
            obj = getattr(geometry, name)
        assert obj is getattr(module, name)
    with pytest.warns(DeprecationWarning):
        from neural_mechanics.geometry import check_constraints as old
    assert old is nm.check_constraints is check_constraints
    with pytest.raises(AttributeError):
        geometry._Hessian  # noqa: B018  (private names were never part of the API)
