"""Numeric certification (nm.certify): group actions leave the loss (and outputs) unchanged.

Groups are derived by hand for small models (docs/theory.md section 1); wrong groups must fail, the
composed action must equal the reference actions applied one after the other, and the model must
be left exactly as it was.
"""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from hand_models import batch, convnet, convnet_groups, mlp, mlp_groups
from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.certify import certify, compose_actions
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from neural_mechanics.symmetry.incidence import GroupIncidence

torch.set_num_threads(1)


def x_mlp(n=16):
    """The inputs of `hand_models.batch` (certify makes its own targets)."""
    return batch("mlp", n)[0]


def x_conv(n=8):
    """The inputs of `hand_models.batch` for the convnet."""
    return batch("conv", n)[0]


@pytest.mark.parametrize("make,groups,x", [(mlp, mlp_groups, x_mlp), (convnet, convnet_groups, x_conv)])
def test_hand_derived_groups_certify(make, groups, x):
    rep = certify(make(), groups(), x(), sample=None)
    assert rep.ok, rep.summary()
    df = rep.to_frame()
    single = df[df.scope == "group"]
    assert len(single) == len(groups())  # sample=None: every group alone
    assert single.rel_loss_change.max() < 1e-13
    quad = single.kind != "translation"
    assert single[quad].rel_output_change.max() < 1e-13
    assert single[~quad].rel_output_change.isna().all()
    assert (single[quad].alpha > math.exp(-1) - 1e-12).all() and (single[quad].alpha < math.e + 1e-12).all()
    names = {r.name for r in rep.all_at_once}
    assert {"<all>", "<all scale>", "<all rescale>", "<all translation>", "<all scale+rescale>"} <= names
    assert all(r.passed for r in rep.all_at_once)
    assert "eps" in rep.summary() and "unchanged" in rep.summary()


def test_wrong_groups_fail_alone_and_at_once():
    wrong = [
        Symmetry("scale", "wrong.scale.3.0", (Member("3.weight", 0, (0,)), Member("3.bias", 0, (0,)))),
        Symmetry("rescale", "wrong.rescale", (Member("0.weight", 0, (1,), "in"), Member("3.weight", 1, (2,), "out"))),
    ]
    rep = certify(mlp(), [*mlp_groups(), *wrong], x_mlp(), sample=None)
    assert not rep.ok
    failed = {r.name for r in rep.results if not r.passed}
    assert failed == {"wrong.scale.3.0", "wrong.rescale"}
    by_name = {r.name: r for r in rep.all_at_once}
    assert not by_name["<all>"].passed and not by_name["<all scale>"].passed and not by_name["<all rescale>"].passed
    assert by_name["<all translation>"].passed
    assert rep.worst().name in failed
    assert rep.worst().rel_output_change > 1e-3
    assert "FAILED" in rep.summary()


def test_translations_fail_under_mse_and_pass_under_cross_entropy():
    rep = certify(mlp(), mlp_groups(), x_mlp(), loss="mse", sample=None)
    fails = {r.kind for r in rep.results if not r.passed}
    assert fails == {"translation"}
    assert certify(mlp(), mlp_groups(), x_mlp(), loss="cross_entropy").ok


def test_callable_loss_and_given_targets():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    rep = certify(mlp(), mlp_groups(), x_mlp(), targets=y, perturbation=0)  # at the model's own parameters
    assert rep.ok
    with torch.no_grad():
        ce = F.cross_entropy(mlp().double()(x_mlp().double()), y)  # fresh model: same seed and data
    assert rep.loss_before == pytest.approx(float(ce), rel=1e-4)
    # a loss that is not softmax-invariant: every translation fails, scale/rescale still pass
    rep2 = certify(mlp(), mlp_groups(), x_mlp(), loss=lambda out: out.pow(2).sum(), sample=None)
    assert {r.kind for r in rep2.results if not r.passed} == {"translation"}
    with pytest.raises(NMechError, match="unknown loss"):
        certify(mlp(), mlp_groups(), x_mlp(), loss="hinge")


def test_composed_action_equals_reference_actions_in_sequence():
    model = mlp()
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    groups = list(mlp_groups())
    g = torch.Generator().manual_seed(0)
    alphas = torch.tensor([math.exp(float(torch.rand(1, generator=g)) * 2 - 1) if s.kind != "translation"
                           else float(torch.randn(1, generator=g)) for s in groups], dtype=torch.float64)
    got = {**params, **compose_actions(GroupIncidence(groups, params), params, alphas)}
    want = dict(params)
    for i in sorted(range(len(groups)), key=lambda i: groups[i].kind == "translation"):
        want.update(groups[i].act(want, float(alphas[i])))  # scale/rescale first, then translations
    for k in params:
        assert torch.allclose(got[k], want[k], rtol=1e-13, atol=1e-13), k


def test_sample_limits_single_group_tests_per_kind():
    rep = certify(convnet(), convnet_groups(), x_conv(), sample=2)
    kinds = [r.kind for r in rep.results]
    assert sorted(kinds) == ["rescale"] * 2 + ["scale"] * 2 + ["translation"] * 2
    assert rep.all_at_once[0].n_groups == len(convnet_groups())
    assert any("sample" in n for n in rep.notes)
    again = certify(convnet(), convnet_groups(), x_conv(), sample=2)
    assert [r.name for r in again.results] == [r.name for r in rep.results]  # seeded


def test_eval_mode_batchnorm_breaks_scale_only():
    model = mlp()
    model(x_mlp(32) * 2 + 1)  # train mode: running statistics move
    model.eval()
    rep = certify(model, mlp_groups(), x_mlp(), sample=None)
    assert {r.kind for r in rep.results if not r.passed} == {"scale"}


def test_real_eps_breaks_scale_symmetry_slightly():
    rep = certify(mlp(), mlp_groups(), x_mlp(), sample=None, norm_eps=None, tol=1.0)
    scale = [r.rel_output_change for r in rep.results if r.kind == "scale"]
    assert 1e-10 < max(scale) < 1e-2  # ~ eps / var with eps = 1e-5
    assert not any("eps set" in n for n in rep.notes)


def test_dropout_sees_the_same_mask_in_every_evaluation():
    assert certify(mlp(dropout=True), mlp_groups(), x_mlp()).ok


def test_model_is_left_exactly_as_it_was():
    model = convnet()
    model(x_conv())  # running stats and num_batches_tracked moved
    model[4].eval()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    certify(model, convnet_groups(), x_conv())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].device == after[k].device
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == modes
    assert model[1].eps == 1e-5 and model[1].track_running_stats
    assert torch.equal(torch.get_rng_state(), rng)


def test_empty_set_and_bad_inputs():
    rep = certify(mlp(), SymmetrySet(), x_mlp())
    assert rep.ok and rep.results == [] and rep.worst() is None
    with pytest.raises(NMechError, match="tensor"):
        certify(mlp(), mlp_groups(), {"x": x_mlp()})
    with pytest.raises(NMechError, match="find_symmetries"):
        certify(mlp(), [Symmetry("scale", "x", (Member("nope.weight"),))], x_mlp())


@pytest.mark.parametrize("make,x", [(mlp, x_mlp), (convnet, x_conv)])
def test_detected_groups_certify(make, x):
    model = make()
    found = find_symmetries(model, x())
    assert len(found) > 0
    rep = certify(model, found, x(), sample=None)
    assert rep.ok, rep.summary()
