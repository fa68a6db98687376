"""`nm.register_op`: custom ops defined here (outside the package) taught to the engine, and what it refuses.

The model is Linear(4, 6) -> op -> Linear(6, 5) -> op -> Linear(5, 3) with a `torch.library` custom op the
engine does not know. Unregistered, the op is a barrier: no rescale group, and the classifier's translation
groups alone (5 columns + bias = 6), with the op counted in meta["blocked_ops"]. Registered as a
pass-through (it is a ReLU: positively homogeneous per entry), each hidden channel c is one rescale group
(writer row c and bias c / next layer's column c): 6 + 5 = 11, plus the same 6 translation groups, and
`nm.certify` passes on all of them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neural_mechanics as nm
from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.ops import OpRuleError, rule_for
from test_detect_support import counts

torch.set_num_threads(1)


@torch.library.custom_op("nmtest::my_relu", mutates_args=())
def my_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


@my_relu.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nmtest::swap_halves", mutates_args=())
def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """Features [a, b] -> [b, a] along the last dim: an index map."""
    h = x.shape[-1] // 2
    return torch.cat([x[..., h:], x[..., :h]], -1)


@swap_halves.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nmtest::blur", mutates_args=())
def blur(x: torch.Tensor) -> torch.Tensor:
    """Average of neighbouring features: linear, but not an index map."""
    return (x + x.roll(1, -1)) / 2


@blur.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nmtest::tap", mutates_args=())
def tap(x: torch.Tensor) -> torch.Tensor:
    """Returns its input unchanged (a stand-in for a logging or checkpointing op)."""
    return x.clone()


@tap.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nmtest::my_linear", mutates_args=())
def my_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(input, weight, bias)


@my_linear.register_fake
def _(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


class Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.act = act

    def forward(self, x):
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def test_unregistered_custom_op_is_a_barrier_and_reported():
    s = nm.find_symmetries(Net(lambda t: my_relu(t)), X)
    assert counts(s) == (6, 0, 0)
    assert s.meta["blocked_ops"]["nmtest.my_relu"] == 2
    text = nm.describe_graph(Net(lambda t: my_relu(t)), X)
    rows = [line for line in text.splitlines() if "nmtest.my_relu" in line]
    assert len(rows) == 2 and all("none: barrier" in r and "<- blocked: nmtest.my_relu" in r for r in rows)


def test_registered_custom_op_gives_certified_groups():
    model = Net(lambda t: my_relu(t))
    with nm.register_op(my_relu, "pass_through"):
        s = nm.find_symmetries(model, X)
        text = nm.describe_graph(model, X)
    assert counts(s) == (6, 0, 11)
    assert "nmtest.my_relu" not in s.meta["blocked_ops"]
    assert sorted(g.name for g in s.filter("rescale")) == sorted(
        [f"rescale:l1[{c}]" for c in range(6)] + [f"rescale:l2[{c}]" for c in range(5)])
    report = nm.certify(model, s, X, sample=None)
    assert report.ok and len(report.results) == len(s), report.summary()
    assert all(" user " in line for line in text.splitlines() if "nmtest.my_relu" in line)
    # the registration was undone when the block ended
    assert rule_for(torch.ops.nmtest.my_relu.default) is None
    assert counts(nm.find_symmetries(model, X)) == (6, 0, 0)


def test_register_by_name_and_unregister():
    handle = nm.register_op("nmtest::my_relu", "pass_through")
    try:
        assert rule_for(torch.ops.nmtest.my_relu.default).family == "user"
        with pytest.raises(OpRuleError, match="already has a rule"):
            nm.register_op(torch.ops.nmtest.my_relu, "barrier")
    finally:
        nm.unregister_op("nmtest.my_relu")
    assert rule_for(torch.ops.nmtest.my_relu.default) is None
    with pytest.raises(OpRuleError, match="no longer in force"):
        handle.remove()


class Swapped(nn.Module):
    """Linear(4, 6) -> relu -> swap_halves -> Linear(6, 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(swap_halves(torch.relu(self.l1(x))))


def test_index_map_rule_replays_the_custom_op():
    """Feature c of l1 lands at position (c + 3) % 6, so l2's column (c + 3) % 6 reads it: 6 rescale groups."""
    model = Swapped()
    assert counts(nm.find_symmetries(model, X)) == (7, 0, 0)
    with nm.register_op(swap_halves, "index_map"):
        s = nm.find_symmetries(model, X)
    assert counts(s) == (7, 0, 6)
    for c in range(6):
        g = s[f"rescale:l1[{c}]"]
        assert [(m.param, m.index) for m in g.members if m.role == "out"] == [("l2.weight", ((c + 3) % 6,))]
    assert nm.certify(model, s, X, sample=None).ok


def test_a_false_index_map_declaration_is_an_error():
    """blur combines neighbouring features: replaying it on labels shows that, and says so."""
    model = Net(lambda t: blur(t))
    with nm.register_op(blur, "index_map"), pytest.raises(OpRuleError, match="combined values"):
        nm.find_symmetries(model, X)


def test_identity_rule_carries_the_softmax_shift():
    """A custom op between the classifier and the loss: as a barrier it stops the translation groups of l3
    (5 columns + bias); declared an identity, they come back."""

    class Tapped(Net):
        def forward(self, x):
            return tap(super().forward(x))

    model = Tapped(torch.relu)
    assert counts(nm.find_symmetries(model, X)) == (0, 0, 11)
    with nm.register_op(tap, "identity"):
        s = nm.find_symmetries(model, X)
    assert counts(s) == (6, 0, 11)
    assert nm.certify(model, s, X, sample=None).ok


class Custom(nn.Module):
    """my_linear(x, W1, b1) -> relu -> Linear(6, 3): a custom op with aten::linear's argument names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.relu(my_linear(x, self.l1.weight, self.l1.bias)))


def test_reusing_a_builtin_rule_reads_the_custom_ops_arguments_by_name():
    """With aten::linear's rule, my_linear's weight rows write channels: 6 rescale groups, certified."""
    model = Custom()
    assert counts(nm.find_symmetries(model, X)) == (7, 0, 0)
    with nm.register_op("nmtest::my_linear", "aten::linear"):
        s = nm.find_symmetries(model, X)
    assert counts(s) == (7, 0, 6)
    assert nm.certify(model, s, X, sample=None).ok


def test_replacing_a_builtin_rule_is_explicit_and_undone():
    model = Net(torch.relu)
    assert counts(nm.find_symmetries(model, X)) == (6, 0, 11)
    with pytest.raises(OpRuleError, match="already has a rule"):
        nm.register_op("aten::relu", "barrier")
    with nm.register_op("aten::relu", "barrier", replace=True):
        assert counts(nm.find_symmetries(model, X)) == (6, 0, 0)
    assert counts(nm.find_symmetries(model, X)) == (6, 0, 11)
    with pytest.raises(OpRuleError, match="no rule registered by the user"):
        nm.unregister_op("aten::relu")


def test_failing_handler_is_reported_as_the_users():
    def broken(a, node):
        raise ValueError("not written yet")

    with nm.register_op(my_relu, broken), pytest.raises(OpRuleError, match="nmtest::my_relu failed on node"):
        nm.find_symmetries(Net(lambda t: my_relu(t)), X)


@pytest.mark.parametrize(("op", "rule", "match"), [
    ("nmtest::does_not_exist", "pass_through", "no operator 'nmtest::does_not_exist' is defined"),
    ("my_relu", "pass_through", "without a namespace"),
    (torch.relu, "pass_through", "not an operator"),
    (42, "pass_through", "cannot use 42"),
    ("nmtest::my_relu", "relu-like", "unknown rule 'relu-like'"),
    ("nmtest::my_relu", "aten::cumsum", "no rule for 'aten::cumsum' to reuse"),
    ("nmtest::my_relu", 3.0, "must be a string, a handler or an OpRule"),
])
def test_bad_registrations_are_clear_errors(op, rule, match):
    with pytest.raises(OpRuleError, match=match) as e:
        nm.register_op(op, rule)
    assert isinstance(e.value, NMechError) and e.value.fix
    assert rule_for(torch.ops.nmtest.my_relu.default) is None
