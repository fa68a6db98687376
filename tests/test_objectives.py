"""The objective registry: one loss name gives the training loss, the accuracy, the symmetry LossSpec and the check
that a model's outputs pair with the data's targets.

Every loss value is compared with a direct computation (torch.nn.functional on reshaped tensors, or an explicit
log-softmax / square written out here); accuracies with a loop over the predictions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neural_mechanics.errors import ConfigError, LossSpecError
from neural_mechanics.experiments.config import load_config
from neural_mechanics.experiments.objectives import build_objective, get_objective, objective_names

torch.set_num_threads(1)
GEN = torch.Generator().manual_seed(0)


def test_registry_names_and_aliases():
    assert objective_names() == ("cross_entropy", "next_token", "mse")
    assert get_objective("softmax").name == "cross_entropy" and get_objective("NONE").name == "mse"
    with pytest.raises(LossSpecError, match="did you mean next_token"):
        get_objective("next_tokens")


def test_cross_entropy_per_example_and_per_pixel_equal_the_explicit_formula():
    ce = build_objective("cross_entropy")
    z, y = torch.randn(5, 4, generator=GEN), torch.randint(0, 4, (5,), generator=GEN)
    assert torch.allclose(ce.loss(z, y), F.cross_entropy(z, y))
    zp, yp = torch.randn(2, 3, 4, 5, generator=GEN), torch.randint(0, 3, (2, 4, 5), generator=GEN)
    explicit = -torch.log_softmax(zp, 1).gather(1, yp[:, None]).mean()
    assert torch.allclose(ce.loss(zp, yp), explicit) and torch.allclose(ce.loss(zp, yp, "sum"), explicit * 40)
    hits = sum(int(zp[b, :, i, j].argmax() == yp[b, i, j]) for b in range(2) for i in range(4) for j in range(5))
    assert int(ce.correct(zp, yp)) == hits and ce.count(yp) == 40
    # any class axis: classes last
    last = build_objective("cross_entropy", class_dim=-1)
    assert torch.allclose(last.loss(zp.movedim(1, -1), yp), ce.loss(zp, yp))


def test_next_token_is_cross_entropy_over_the_vocabulary_of_every_position():
    nt = build_objective("next_token")
    z, y = torch.randn(2, 6, 11, generator=GEN), torch.randint(0, 11, (2, 6), generator=GEN)
    assert torch.allclose(nt.loss(z, y), F.cross_entropy(z.reshape(12, 11), y.reshape(12)))
    assert int(nt.correct(z, y)) == int((z.reshape(12, 11).argmax(1) == y.reshape(12)).sum()) and nt.count(y) == 12
    assert nt.spec.kind == "softmax" and nt.spec.class_dim == -1
    # a Hugging Face style output: the logits are read from it
    assert torch.allclose(nt.loss({"logits": z, "past": torch.zeros(1)}, y), nt.loss(z, y))


def test_mse_has_no_accuracy_and_no_softmax():
    mse = build_objective("mse")
    out, y = torch.randn(3, 2, generator=GEN), torch.randn(3, 2, generator=GEN)
    assert torch.allclose(mse.loss(out, y), ((out - y) ** 2).mean())
    assert mse.correct(out, y) is None and not mse.has_accuracy and mse.spec.kind == "plain"


@pytest.mark.parametrize(
    ("loss", "out_shape", "targets", "needles"),
    [
        ("cross_entropy", (4, 3), torch.zeros(4, 6, 6, dtype=torch.long), ["(4, 3)", "(4, 6, 6)", "per-pixel model"]),
        ("cross_entropy", (4, 7, 9), torch.zeros(4, 7, dtype=torch.long), ["next_token", "(4, 9)"]),
        ("cross_entropy", (4, 3, 5, 5), torch.zeros(4, dtype=torch.long), ["pool them"]),
        ("cross_entropy", (4, 3), torch.zeros(4), ["class indices", "mse"]),
        ("cross_entropy", (4, 3), torch.tensor([0, 1, 2, 3]), ["range over [0, 3]", "num_classes: 4"]),
        ("next_token", (4, 7, 9), torch.zeros(4, 8, dtype=torch.long), ["(4, 7)"]),
        ("mse", (4, 3), torch.zeros(4, dtype=torch.long), ["class labels", "cross_entropy"]),
        ("mse", (4, 3), torch.zeros(4, 2), ["(4, 3)", "(4, 2)"]),
    ],
    ids=["pixel-targets-on-a-classifier", "token-logits-under-dim-1", "extra-axes", "float-targets",
         "too-few-classes", "token-length", "mse-integers", "mse-shape"],
)
def test_a_wrong_pairing_says_what_was_expected(loss, out_shape, targets, needles):
    with pytest.raises(LossSpecError) as info:
        build_objective(loss).check(torch.zeros(out_shape), targets)
    text = f"{info.value.what} {info.value.fix}"
    for needle in needles:
        assert needle in text, (needle, text)


def test_right_pairings_pass_and_ignore_index_is_allowed():
    padded = torch.full((2, 4, 4), -100).index_fill(1, torch.tensor([0]), 2)  # F.cross_entropy skips -100
    build_objective("cross_entropy").check(torch.zeros(2, 3, 4, 4), padded)
    build_objective("next_token").check(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
    build_objective("mse").check(torch.zeros(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("loss", ["cross_entropy", "next_token", "mse"], ids=str)
def test_random_targets_fit_the_output_and_are_seeded(loss):
    objective = build_objective(loss)
    out = torch.randn(3, 5, 7, generator=GEN)
    a = objective.random_targets(out, torch.Generator().manual_seed(4))
    b = objective.random_targets(out, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    objective.check(out, a)
    expected = {"cross_entropy": (3, 7), "next_token": (3, 5), "mse": (3, 5, 7)}[loss]
    assert tuple(a.shape) == expected
    assert math.isfinite(float(objective.loss(out, a)))


def test_the_loss_section_of_a_config():
    assert load_config("demo").loss.name == "cross_entropy"
    cfg = load_config("demo", ["loss=next_token"])
    assert cfg.loss.name == "next_token" and build_objective(cfg.loss).spec.class_dim == -1
    assert build_objective(load_config("demo", ["loss.class_dim=2"]).loss).spec.class_dim == 2
    with pytest.raises(ConfigError, match="did you mean mse"):
        load_config("demo", ["loss=mes"])
    with pytest.raises(ConfigError, match="only cross_entropy takes it"):
        load_config("demo", ["loss=mse", "loss.class_dim=1"])
    with pytest.raises(LossSpecError, match="no class axis"):
        build_objective("next_token", class_dim=1)
