"""Token losses (symmetry/loss.py): next-token (shifted targets, or the shift inside) and masked-token cross-entropy,
the class-axis rule for token logits (B, T, V), and Hugging Face output objects accepted alike by find_symmetries,
certify and check_constraints.

The model is a tiny causal language model written in torch; its groups are derived by hand in `TinyCausalLM`'s
docstring, and every loss value is compared with a direct recomputation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neural_mechanics as nm
from neural_mechanics.errors import LossSpecError
from neural_mechanics.experiments.objectives import build_objective
from neural_mechanics.symmetry.capture import capture
from neural_mechanics.symmetry.generic_point import generic_point
from neural_mechanics.symmetry.loss import IGNORE_INDEX, LossSpec, as_loss_spec, class_axis
from neural_mechanics.symmetry.utils import working_copy

torch.set_num_threads(1)
V, D, H, T, B = 11, 4, 6, 5, 3


class TinyCausalLM(nn.Module):
    """tokens (B, T) -> logits (B, T, V): x_t = emb[tok_t] + pos[t]; h_t = relu(W0 x_t + W1 x_(t-1) + b) (a causal
    convolution of width 2: Conv1d with left padding, the extra position sliced off); logits_t = head(h_t).

    Hand-derived groups (softmax over the vocabulary axis):
    - rescale, one per embedding feature d (D = 4): emb.weight[:, d] and pos[:, d] write feature d (summed), read
      by conv.weight[:, d] (both taps): A1 = {emb column d, pos column d}, A2 = {conv.weight[:, d]};
    - rescale, one per hidden unit c (H = 6): conv row c and bias c (A1), head column c (A2), through the ReLU;
    - translation: adding alpha to head column c shifts every logit of position t by alpha h_t[c], the same for all
      V classes, which the softmax over V ignores (H = 6 groups); adding alpha to the whole head bias shifts every
      logit by alpha (1 group). Total 7.
    Over the sequence axis instead (class_dim=1) nothing is constant along the softmax axis: no translation.
    """

    def __init__(self, out: str = "tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(V, D), nn.Parameter(torch.randn(T, D) * 0.5)
        self.conv, self.head = nn.Conv1d(D, H, 2, padding=1), nn.Linear(H, V)
        self.out = out

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos
        h = F.relu(self.conv(x.transpose(1, 2))[..., : tokens.shape[1]]).transpose(1, 2)
        logits = self.head(h)
        if self.out == "hf":
            from transformers.modeling_outputs import CausalLMOutput  # optional dependency, imported when asked

            return CausalLMOutput(logits=logits, hidden_states=(x, h))
        return (logits, h) if self.out == "tuple" else logits


TOKENS = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
HAND = {"translation": H + 1, "scale": 0, "rescale": D + H}


def logits_at(model: nn.Module, point: str) -> torch.Tensor:
    """The logits on certify's float64 copy, at the model's own parameters or certify's generic point (seed 0)."""
    work, _ = working_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    if point == "generic":
        params = generic_point(params, seed=0).params
    with torch.no_grad():
        out = torch.func.functional_call(work, params, (TOKENS,))
    return out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out.logits


def test_the_class_axis_rule():
    assert [class_axis(n) for n in range(6)] == [0, 0, 1, 2, 1, 1]  # (), (C), (N, C), (B, T, V), (N, C, H, W), 5-D
    assert class_axis(3, 1) == 1 and class_axis(4, -1) == 3 and class_axis(1, 5) == 0
    with pytest.raises(LossSpecError, match="class_dim 3 is out of range"):
        class_axis(3, 3)


@pytest.mark.parametrize("loss", ["next_token", "causal_lm", "masked_token", "cross_entropy"])
def test_token_losses_find_the_lm_heads_translations_over_the_vocabulary(loss):
    found = nm.find_symmetries(TinyCausalLM(), TOKENS, loss=loss)
    assert found.counts() == HAND, found.details()
    heads = {g.members[0].index for g in found.filter("translation") if g.members[0].dim == 1}
    assert heads == {(c,) for c in range(H)}
    assert "softmax over axis 2" in found.meta["loss_detail"]
    assert nm.find_symmetries(TinyCausalLM(), TOKENS, loss=LossSpec.cross_entropy(class_dim=1)).counts() == {
        "translation": 0, "scale": 0, "rescale": D + H}
    rep = nm.certify(TinyCausalLM(), found, TOKENS, loss=loss, sample=None)
    assert rep.ok and not rep.inconclusive(), rep.summary()


def test_next_token_takes_the_next_token_ids_as_the_training_objective_does():
    """"next_token": targets (B, T) already shifted (the tokens dataset's pairs), every position scored; the same
    LossSpec as the training objective of that name (experiments/objectives.py), so a run and its checks agree."""
    model = TinyCausalLM()
    nxt = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    assert as_loss_spec("next_token") == build_objective("next_token").spec
    cap = capture(model, TOKENS, "next_token")
    got = cap.gm([p.detach() for p in model.parameters()], [], TOKENS)
    with torch.no_grad():
        want = F.log_softmax(model(TOKENS), -1).sum()
    assert torch.allclose(got, want, rtol=1e-6)
    found = nm.find_symmetries(model, TOKENS, loss="next_token")
    rep = nm.certify(model, found, TOKENS, loss="next_token", targets=nxt, sample=4)
    z = logits_at(model, "generic")
    assert rep.loss_before == pytest.approx(float(F.cross_entropy(z.reshape(-1, V), nxt.reshape(-1))), rel=1e-12)
    assert rep.compared == [f"output ({B}, {T}, {V})"]
    check = nm.check_constraints(model, "next_token", (TOKENS, nxt), found)
    z = logits_at(model, "own")
    assert check.loss == pytest.approx(float(F.cross_entropy(z.reshape(-1, V), nxt.reshape(-1))), rel=1e-12)
    assert check.ok(), check.summary()


def test_causal_lm_scores_position_t_against_target_t_plus_1():
    model = TinyCausalLM()
    # the captured stand-in reads every position but the last: sum(log_softmax(z[:, :-1], -1))
    cap = capture(model, TOKENS, "causal_lm")
    got = cap.gm([p.detach() for p in model.parameters()], [], TOKENS)
    with torch.no_grad():
        want = F.log_softmax(model(TOKENS)[:, :-1], -1).sum()
    assert torch.allclose(got, want, rtol=1e-6)
    # certify and check_constraints: CE(logits[:, :-1], tokens[:, 1:]), targets aligned with the inputs
    rep = nm.certify(model, nm.find_symmetries(model, TOKENS, loss="causal_lm"), TOKENS, loss="causal_lm",
                     targets=TOKENS, sample=4)
    z = logits_at(model, "generic")
    assert rep.loss_before == pytest.approx(float(F.cross_entropy(z[:, :-1].reshape(-1, V), TOKENS[:, 1:].reshape(-1))),
                                            rel=1e-12)
    assert rep.compared == [f"output[:, :-1] ({B}, {T - 1}, {V})"]
    check = nm.check_constraints(model, "causal_lm", (TOKENS, TOKENS), nm.find_symmetries(model, TOKENS,
                                                                                           loss="causal_lm"))
    z = logits_at(model, "own")
    assert check.loss == pytest.approx(float(F.cross_entropy(z[:, :-1].reshape(-1, V), TOKENS[:, 1:].reshape(-1))),
                                       rel=1e-12)
    assert check.ok(), check.summary()


def test_masked_token_ignores_unmasked_positions():
    model = TinyCausalLM()
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[:, 1] = TOKENS[:, 1]
    labels[0, 3] = TOKENS[0, 3]
    found = nm.find_symmetries(model, TOKENS, loss="masked_token")
    check = nm.check_constraints(model, "masked_token", (TOKENS, labels), found)
    z = logits_at(model, "own")
    scored = labels != IGNORE_INDEX
    want = float(F.cross_entropy(z[scored], labels[scored]))
    assert check.loss == pytest.approx(want, rel=1e-12) and check.ok(), check.summary()


def test_token_losses_refuse_what_they_cannot_score():
    spec = as_loss_spec("causal_lm")
    with pytest.raises(LossSpecError, match="aligned with the logits"):
        spec.bind(TOKENS[:, 1:])(logits_at(TinyCausalLM(), "own"))
    with pytest.raises(LossSpecError, match="T > 1"):
        nm.certify(TinyCausalLM(), [], TOKENS[:, :1], loss="causal_lm")
    with pytest.raises(LossSpecError, match="target_offset"):
        LossSpec("plain", "x", target_offset=1)


@pytest.mark.parametrize("out", ["tuple", "hf"])
def test_structured_outputs_are_read_alike_by_the_three_entry_points(out):
    """A tuple (logits, hidden) and a Hugging Face CausalLMOutput(logits, hidden_states): the softmax losses read the
    logits; the extra outputs (hidden states that real groups change) are not compared, so every group certifies."""
    if out == "hf":
        pytest.importorskip("transformers")
    model = TinyCausalLM(out)
    for loss in ("next_token", "causal_lm", "cross_entropy"):
        found = nm.find_symmetries(model, TOKENS, loss=loss)
        assert found.counts() == HAND
        rep = nm.certify(model, found, TOKENS, loss=loss, sample=None)
        assert rep.ok, rep.summary()
        where = "output[0]" if out == "tuple" else "output['logits']"
        assert rep.compared[0].startswith(where)
        check = nm.check_constraints(model, loss, (TOKENS, TOKENS), found, hessian=False)
        assert check.ok(), check.summary()
    # mse reads every floating output as it is: the hidden-unit groups change h, an output of both forms, so they are
    # not found and fail certification; the embedding-feature groups change x, an output of the HF form only
    plain = nm.find_symmetries(model, TOKENS, loss="mse")
    assert plain.counts() == {"translation": 0, "scale": 0, "rescale": D if out == "tuple" else 0}
    rep = nm.certify(model, hand_unit_groups(), TOKENS, loss="mse", sample=None)
    assert len(rep.compared) == (2 if out == "tuple" else 3) and not any(r.passed for r in rep.results)


def hand_unit_groups() -> list[nm.Symmetry]:
    """The hidden-unit rescale groups of TinyCausalLM's docstring."""
    return [nm.Symmetry("rescale", f"unit{c}", (nm.Member("conv.weight", 0, (c,), "in"),
                                                nm.Member("conv.bias", 0, (c,), "in"),
                                                nm.Member("head.weight", 1, (c,), "out"))) for c in range(H)]
