"""One loss specification (symmetry/loss.py) for find_symmetries, certify and check_constraints.

Every call form that worked before LossSpec still works and means the same loss in all three entry points; each
loss value is compared with a direct float64 recomputation; bad loss arguments are clear `LossSpecError`s.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import neural_mechanics as nm
from hand_models import batch, mlp, mlp_groups
from neural_mechanics.errors import CaptureError, InputShapeError, LossSpecError, NMechError
from neural_mechanics.symmetry.capture import capture
from neural_mechanics.symmetry.generic_point import generic_point
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from neural_mechanics.symmetry.loss import NAMED_LOSSES, LossSpec, as_loss_spec, first_tensor
from neural_mechanics.symmetry.utils import as_args, cast_inputs, working_copy
from test_cli import run

torch.set_num_threads(1)


def reference_outputs(model, x):
    """The model's outputs on the float64 working copy the entry points use (negligible eps; inputs cast)."""
    work, _ = working_copy(model)
    with torch.no_grad():
        return work(*cast_inputs(as_args(x), torch.float64, None))


# ---- conversion: every accepted form -------------------------------------------------------------------------


def outputs_only(out):
    return out.pow(2).sum()


def optional_targets(out, y=None):
    return out.sum() if y is None else F.cross_entropy(out, y)


@pytest.mark.parametrize("loss,kind,name,takes_targets", [
    ("cross_entropy", "softmax", "cross_entropy", False),
    ("softmax", "softmax", "softmax", False),
    ("Cross_Entropy", "softmax", "cross_entropy", False),
    ("mse", "plain", "mse", False),
    ("none", "plain", "none", False),
    (None, "plain", "none", False),
    (outputs_only, "custom", "outputs_only", False),
    (F.cross_entropy, "custom", "cross_entropy", True),
    (nn.CrossEntropyLoss(), "custom", "CrossEntropyLoss", True),  # forward(input, target)
    (functools.partial(F.cross_entropy, reduction="sum"), "custom", "partial", True),
])
def test_each_form_converts(loss, kind, name, takes_targets):
    spec = as_loss_spec(loss)
    assert (spec.kind, spec.name, spec.takes_targets) == (kind, name, takes_targets)
    assert as_loss_spec(loss, targets_by_default=True) == spec  # the signature decides, not the entry point


def test_callables_accepting_either_form_keep_each_entry_points_reading():
    """`f(out, y=None)` and `*args` callables: outputs-only for find_symmetries/certify, (outputs, targets) for
    check_constraints, as before LossSpec existed."""
    for fn in (optional_targets, lambda *a: a[0].sum()):
        assert not as_loss_spec(fn).takes_targets
        assert as_loss_spec(fn, targets_by_default=True).takes_targets


def test_a_loss_spec_is_used_as_it_is_and_named_losses_are_data():
    spec = LossSpec.cross_entropy(class_dim=-1)
    assert as_loss_spec(spec) is spec
    assert set(NAMED_LOSSES) == {"cross_entropy", "softmax", "next_token", "causal_lm", "masked_token", "mse", "none"}
    assert LossSpec.of_outputs(outputs_only).takes_targets is False
    assert LossSpec.of_outputs_and_targets(F.mse_loss, name="l2").name == "l2"
    assert nm.LossSpec is LossSpec


@pytest.mark.parametrize("bad,match", [
    ("hinge", "unknown loss 'hinge'"),
    (3, "loss must be a string, None, a callable or a LossSpec, got int"),
    (lambda: 0, "cannot be called as loss"),
    (lambda out, y, z: 0, "cannot be called as loss"),
    (lambda out, *, weight: 0, "cannot be called as loss"),
])
def test_bad_loss_arguments_are_clear_errors(bad, match):
    with pytest.raises(LossSpecError, match=match) as e:
        as_loss_spec(bad)
    assert isinstance(e.value, NMechError) and isinstance(e.value, CaptureError)  # what find_symmetries raised
    assert "what to do" in str(e.value)


def test_bad_loss_specs_are_refused_when_built():
    with pytest.raises(LossSpecError, match="needs a callable fn"):
        LossSpec("custom", "x")
    with pytest.raises(LossSpecError, match="takes no fn"):
        LossSpec("softmax", "x", fn=outputs_only)
    with pytest.raises(LossSpecError, match="unknown LossSpec kind"):
        LossSpec("hinge", "x")  # type: ignore[arg-type]


# ---- the three entry points use the same loss ---------------------------------------------------------------

X, Y = batch("mlp")
SOFTMAX_FORMS = ["cross_entropy", "softmax", LossSpec.cross_entropy(), F.cross_entropy, nn.CrossEntropyLoss(),
                 LossSpec.of_outputs_and_targets(F.cross_entropy)]


def form_id(loss: object) -> str:
    """A test id without memory addresses (pytest-xdist needs the same ids in every worker)."""
    if isinstance(loss, str):
        return repr(loss)
    if isinstance(loss, LossSpec):
        return f"LossSpec({loss.kind},{loss.name})"
    return getattr(loss, "__name__", type(loss).__name__)


@pytest.mark.parametrize("loss", SOFTMAX_FORMS, ids=form_id)
def test_certify_and_check_constraints_evaluate_the_same_cross_entropy(loss):
    want = float(F.cross_entropy(reference_outputs(mlp(), X), Y))
    cert = nm.certify(mlp(), mlp_groups(), X, loss=loss, targets=Y, sample=2, perturbation=0)  # the model's point
    check = nm.check_constraints(mlp(), loss, (X, Y), mlp_groups(), hessian=False)
    assert cert.loss_before == pytest.approx(want, rel=1e-12)
    assert check.loss == pytest.approx(want, rel=1e-12)
    assert cert.ok and check.ok(), (cert.summary(), check.summary())


def test_mse_and_outputs_only_losses_agree_too():
    t = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    out = reference_outputs(mlp(), X)
    for loss, want in (("mse", F.mse_loss(out, t.double())), (outputs_only, outputs_only(out))):
        cert = nm.certify(mlp(), mlp_groups(), X, loss=loss, targets=t, sample=2, perturbation=0)
        check = nm.check_constraints(mlp(), loss, (X, t), mlp_groups(), hessian=False)
        assert cert.loss_before == pytest.approx(float(want), rel=1e-12)
        assert check.loss == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "softmax", LossSpec.cross_entropy()], ids=form_id)
def test_find_symmetries_captures_the_softmax_stand_in(loss):
    """What find_symmetries traces is sum(log_softmax(logits, dim=1)), whatever the form naming cross-entropy."""
    model = mlp()
    cap = capture(model, X, loss)
    params = [p.detach() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    got = cap.gm(params, buffers, X)
    with torch.no_grad():
        want = F.log_softmax(model(X), dim=1).sum()
    assert torch.allclose(got, want, rtol=1e-6)
    found = nm.find_symmetries(model, X, loss=loss)
    assert [g.name for g in found] == [g.name for g in nm.find_symmetries(model, X)]
    assert found.meta["loss"] == as_loss_spec(loss).name


def test_plain_forms_find_the_same_groups():
    names = {str(loss): [g.name for g in nm.find_symmetries(mlp(), X, loss=loss)]
             for loss in ("mse", None, LossSpec.plain())}
    assert len(set(map(tuple, names.values()))) == 1
    assert names["mse"] and not any(n.startswith("translation") for n in names["mse"])


def test_a_targets_loss_is_refused_by_find_symmetries_and_needs_targets_in_certify():
    with pytest.raises(LossSpecError, match="captures a loss of the outputs alone"):
        nm.find_symmetries(mlp(), X, loss=F.cross_entropy)
    with pytest.raises(LossSpecError, match="no targets were given"):
        nm.certify(mlp(), mlp_groups(), X, loss=F.cross_entropy)
    with pytest.raises(LossSpecError, match="needs targets"):
        nm.check_constraints(mlp(), "cross_entropy", (X, None), mlp_groups())


def test_the_three_entry_points_share_one_input_normalisation():
    for call in (lambda: nm.find_symmetries(mlp(), {"x": X}), lambda: nm.certify(mlp(), mlp_groups(), {"x": X}),
                 lambda: nm.check_constraints(mlp(), F.cross_entropy, ({"x": X}, Y), mlp_groups())):
        with pytest.raises(InputShapeError, match="example inputs must be a tensor or a tuple of tensors, got dict"):
            call()


def test_cli_reports_a_bad_loss_as_a_user_error(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "symmetries", "mlp-bn", "--loss", "hinge")
    assert code == 2 and "unknown loss 'hinge'" in err and "what to do" in err


# ---- what the loss reads: several outputs, token logits ------------------------------------------------------


class TwoHeads(nn.Module):
    """Returns (logits, hidden) or {"logits", "hidden"}: the hidden ReLU features are an extra output."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head, self.as_dict = nn.Linear(4, 5), nn.Linear(5, 3), as_dict

    def forward(self, x):
        h = F.relu(self.fc(x))
        logits = self.head(h)
        return {"logits": logits, "hidden": h} if self.as_dict else (logits, h)


def two_heads_groups():
    """Hand-derived: rescale of hidden unit c (fc row c + bias c in, head column c out), head translations."""
    groups = [Symmetry("rescale", f"r{c}", (Member("fc.weight", 0, (c,), "in"), Member("fc.bias", 0, (c,), "in"),
                                            Member("head.weight", 1, (c,), "out"))) for c in range(5)]
    groups += [Symmetry("translation", f"t{j}", (Member("head.weight", 1, (j,)),)) for j in range(5)]
    return SymmetrySet([*groups, Symmetry("translation", "tb", (Member("head.bias"),))])


@pytest.mark.parametrize("as_dict", [False, True])
def test_certify_compares_only_what_the_loss_reads(as_dict):
    """The rescale groups change the hidden output but not the logits. Cross-entropy reads the logits only, so the
    groups certify (before LossSpec certify refused non-tensor outputs for a named loss). A callable loss is
    compared on what it reads, found by autograd: reading the logits only, the groups certify too; reading the
    hidden output as well (even with weight 0, so that the loss value does not move), they fail on that output."""
    model, x = TwoHeads(as_dict), torch.randn(6, 4)
    rep = nm.certify(model, two_heads_groups(), x, sample=None)
    assert rep.ok, rep.summary()
    where = "output['logits']" if as_dict else "output[0]"
    assert rep.compared == [f"{where} (6, 3)"] and where in rep.summary()
    assert rep.loss_before == pytest.approx(
        float(F.cross_entropy(first_tensor(generic_outputs(model, x)), _random_targets(6, 3))), rel=1e-12)
    logits_only = nm.certify(model, two_heads_groups(), x, sample=None,
                             loss=lambda out: F.log_softmax(first_tensor(out), dim=1).sum())
    assert logits_only.ok and logits_only.compared == rep.compared, logits_only.summary()
    hidden = "output['hidden']" if as_dict else "output[1]"
    both = nm.certify(model, two_heads_groups(), x, sample=None, loss=reads_hidden_too)
    assert both.compared == [f"{where} (6, 3)", f"{hidden} (6, 5)"]
    assert {r.kind for r in both.results if not r.passed} == {"rescale"}
    assert all(r.rel_loss_change < 1e-12 for r in both.results)


def reads_hidden_too(out):
    """Cross-entropy's stand-in plus 0 x the hidden output: the value ignores it, the graph reads it."""
    hidden = out["hidden"] if isinstance(out, dict) else out[1]
    return F.log_softmax(first_tensor(out), dim=1).sum() + 0 * hidden.sum()


def generic_outputs(model, x):
    """The model's outputs at certify's generic point (seed 0), recomputed from symmetry/generic_point.py's rule."""
    work, _ = working_copy(model)
    point = generic_point({k: v.detach() for k, v in work.named_parameters()}, seed=0)
    with torch.no_grad():
        return functional_call(work, {**point.params, **dict(work.named_buffers())},
                               cast_inputs(as_args(x), torch.float64, None))


def _random_targets(n: int, classes: int) -> torch.Tensor:
    """certify's seeded targets: the first draw of its generator (seed 0)."""
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(0))


class TokenModel(nn.Module):
    """Embedding -> Linear -> ReLU -> head: token logits (B, T, V)."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.head = nn.Embedding(vocab, d), nn.Linear(d, hidden), nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.head(F.relu(self.fc(self.emb(tokens))))


@pytest.mark.parametrize("loss", ["cross_entropy", LossSpec.cross_entropy(class_dim=-1), "masked_token"],
                         ids=form_id)
def test_token_logits_take_the_softmax_over_the_vocabulary(loss):
    """3-D logits (B, T, V) take the softmax over the LAST axis by default (the class-axis rule of symmetry/loss.py),
    as with class_dim=-1 and the masked-token loss: each (sample, position) has its own softmax over V, so shifting
    all logits of a position is invariant, and every head column and the head bias are translation groups (5 + 1,
    hand-derived); rescale: the 4 embedding dims (emb column in, fc column out) and the 5 ReLU units (fc row + bias
    in, head column out). The sequence axis (dim 1) would give no translation: class_dim=1 says so explicitly."""
    model, tokens = TokenModel(), torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(2))
    found = nm.find_symmetries(model, tokens, loss=loss)
    assert found.counts() == {"translation": 6, "scale": 0, "rescale": 9}
    assert nm.find_symmetries(model, tokens, loss=LossSpec.cross_entropy(class_dim=1)).counts()["translation"] == 0
    targets = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(3))
    rep = nm.certify(model, found, tokens, loss=loss, targets=targets, sample=None)
    want = float(F.cross_entropy(generic_outputs(model, tokens).reshape(-1, 7), targets.reshape(-1)))
    assert rep.ok and rep.loss_before == pytest.approx(want, rel=1e-12), rep.summary()
    assert "softmax over axis 2 of output (3, 6, 7)" in rep.summary()
    logits = reference_outputs(model, tokens)
    check = nm.check_constraints(model, loss, (tokens, targets), found)
    want = float(F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1)))
    assert check.loss == pytest.approx(want, rel=1e-12) and check.ok(), check.summary()
    bound = as_loss_spec(loss).bind(like=logits, generator=torch.Generator().manual_seed(0))  # targets (B, T) < V
    assert torch.isfinite(bound(logits))


class ScalarOutput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.out(F.relu(self.fc(x))).sum()


def test_scalar_logits_and_out_of_range_class_axes_are_refused():
    """certify (as before) and check_constraints refuse cross-entropy of a 0-d output; find_symmetries reads it as it
    always did (log_softmax over its one axis is a constant, so only the 4 ReLU rescale groups of the output remain)."""
    with pytest.raises(LossSpecError, match=r"needs outputs of shape \(N, C, ...\), got \(\)"):
        nm.certify(ScalarOutput(), SymmetrySet(), torch.randn(5, 3))
    with pytest.raises(LossSpecError, match="needs outputs of shape"):
        nm.check_constraints(ScalarOutput(), "cross_entropy", (torch.randn(5, 3), torch.tensor(0)), SymmetrySet())
    assert nm.find_symmetries(ScalarOutput(), torch.randn(5, 3)).counts() == {"translation": 0, "scale": 0,
                                                                              "rescale": 4}
    with pytest.raises(LossSpecError, match="class_dim 3 is out of range"):
        LossSpec.cross_entropy(class_dim=3).bind(like=torch.zeros(2, 3), generator=torch.Generator())
    with pytest.raises(LossSpecError, match="compares 2 output tensor"):
        nm.certify(TwoHeads(), two_heads_groups(), torch.randn(6, 4), loss="mse", targets=torch.zeros(6, 3))
