"""The op-rule table (symmetry/ops/registry.py): one record per op, lookups, named arguments, what it refuses.

Also the soundness fixes that reading the table by namespace and arguments by name brought: an op of another
namespace that shares an ATen op's name is not that op, and integer casts and rounded divisions are barriers
(before, each was treated as a positively homogeneous pass-through, and the groups through it failed
certification).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.operator_schemas import normalize_function

from neural_mechanics.symmetry.capture import capture
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.ops import FAMILIES, Flag, Shift, canonical, op_args, rule_for, rules, shift_kind
from neural_mechanics.symmetry.ops.registry import op_exists
from test_detect_support import certify_groups, counts

torch.set_num_threads(1)


def test_one_record_per_op_and_every_op_exists():
    table = rules(builtin_only=True)
    keys = [r.op for r in table]
    assert len(keys) == len(set(keys))
    for r in table:
        assert r.op == "getitem" or (r.op.startswith("aten::") and op_exists(r.op)), r.op
        assert r.family in {f.__name__.rpartition(".")[2] for f in FAMILIES}
        assert r.summary, r.op
        # a record says something: a channel rule, a shift rule, a flag, or (ops/barriers.py) why it blocks
        assert r.channel is not None or r.shift is not None or r.flags or r.family == "barriers", f"{r.op} is empty"


def test_lookup_by_packet_overload_and_in_place_variant():
    relu = rule_for(torch.ops.aten.relu)
    assert relu is not None and relu.op == "aten::relu"
    assert rule_for(torch.ops.aten.relu.default) is relu
    assert rule_for(torch.ops.aten.relu_.default) is relu  # in place: the out-of-place op's rule
    add = rule_for(torch.ops.aten.add.Tensor)
    assert rule_for(torch.ops.aten.add.Scalar) is add and rule_for(torch.ops.aten.add_.Tensor) is add
    assert rule_for(operator.getitem).op == "getitem"
    gelu = rule_for(torch.ops.aten.gelu.default)  # not homogeneous: a known barrier (ops/barriers.py), with its reason
    assert gelu is not None and gelu.channel is None and gelu.family == "barriers" and "homogeneous" in gelu.summary
    assert rule_for(torch.ops.aten.cumsum.default) is None  # no record: an unknown op, a barrier too
    assert rule_for(torch.ops.aten.softmax.int).channel is None  # a sink: barrier for channels, shift rule only


def test_shift_rules_and_their_conditions():
    """One record says both what an op does to channels and to a softmax shift (with its condition)."""
    cap = capture(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Dropout(0.5)).train(), torch.randn(2, 3))
    drop = [n for n in cap.graph.nodes if canonical(n) == "aten::dropout"]
    assert [shift_kind(n) for n in drop] == [Shift.SAME, None]  # p = 0 is the identity, p = 0.5 a random mask
    assert rule_for(torch.ops.aten.relu.default).shift is None
    assert rule_for(torch.ops.aten.view.default).shift.kind is Shift.INDEX_MAP
    assert Flag.LEAK in rule_for(torch.ops.aten.item.default).flags
    assert Flag.REARRANGE in rule_for(torch.ops.aten.t.default).flags


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16"])
def test_named_arguments_equal_torch_fx_normalisation(name):
    """op_args (a cached signature, bound by position) gives exactly torch.fx's normalised arguments."""
    kwargs = {"image_size": 32} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, num_classes=10, **kwargs).train()
    cap = capture(model, torch.randn(2, 3, 32, 32))
    checked = 0
    for node in cap.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        ref = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        assert ref is not None, node.format_node()
        assert op_args(node) == ref.kwargs, node.format_node()
        checked += 1
    assert checked > 50


@torch.library.custom_op("nmtest_ns::relu", mutates_args=())
def fake_named_relu(x: torch.Tensor) -> torch.Tensor:
    """Named like aten::relu but not one: a sigmoid (not positively homogeneous)."""
    return torch.sigmoid(x)


@fake_named_relu.register_fake
def _(x):
    return torch.empty_like(x)


class Between(nn.Module):
    """Linear(4, 5) -> f -> Linear(5, 3)."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.f = f

    def forward(self, x):
        return self.l2(self.f(self.l1(x)))


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", ["other_namespace_relu", "int_cast", "floor_division"])
def test_non_homogeneous_ops_are_barriers(case):
    """0 rescale groups and the op blocked; translation of l2 stays (5 columns + bias = 6), and certifies."""
    f, blocked = {
        "other_namespace_relu": (lambda t: fake_named_relu(t), "nmtest_ns.relu"),
        "int_cast": (lambda t: F.relu(t).to(torch.int64).to(t.dtype), "aten.to"),
        "floor_division": (lambda t: torch.div(F.relu(t), 0.3, rounding_mode="floor"), "aten.div"),
    }[case]
    model = Between(f)
    s = find_symmetries(model, X)
    assert counts(s) == (6, 0, 0), s.details()
    assert s.meta["blocked_ops"][blocked] == 1
    certify_groups(model, list(s), X)
    assert rule_for(torch.ops.nmtest_ns.relu.default) is None


def test_float_casts_and_exact_division_pass():
    """The same model with a float cast and a plain division: 5 rescale groups (l1 row c + bias c / l2 column c)."""
    model = Between(lambda t: torch.div(F.relu(t).to(torch.float64).to(t.dtype), 0.3))
    s = find_symmetries(model, X)
    assert counts(s) == (6, 0, 5)
    certify_groups(model, list(s), X)


class ViewAsScale(nn.Module):
    """A layer scale reached through view_as: relu(l1(x)) * g.view_as(row), g of shape (2, 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.g = nn.Parameter(torch.rand(2, 3) + 0.5)

    def forward(self, x):
        h = F.relu(self.l1(x))
        return self.l2(self.g.view_as(h[0]) * h)


def test_layer_scale_through_view_as():
    """Crashed before (the chain replay passed a graph node to view_as). Feature p is scaled by g.flatten()[p],
    i.e. g[p // 3, p % 3]; g's slices along its last dim, g[:, i], multiply features i and i + 3. So: 3 rescale
    groups (l1 rows and biases i, i + 3 / g[:, i]) + 3 (g[:, i] / l2 columns i, i + 3) + translation 6 + 1."""
    model = ViewAsScale()
    s = find_symmetries(model, X)
    assert counts(s) == (7, 0, 6), s.details()
    certify_groups(model, list(s), X)


class TransposedScale(nn.Module):
    """relu(l1(x)) * g.t() with g of shape (6, 1): a layer scale through `t`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.g = nn.Parameter(torch.rand(6, 1) + 0.5)

    def forward(self, x):
        return self.l2(F.relu(F.relu(self.l1(x)) * self.g.t()))


def test_layer_scale_through_transpose():
    """`t` rearranges like `transpose` (before, it was not a layer-scale chain op: the product was a barrier).
    6 groups (l1 row c + bias c / g[c]) + 6 (g[c] / l2 column c) + translation 6 + 1."""
    model = TransposedScale()
    s = find_symmetries(model, X)
    assert counts(s) == (7, 0, 12), s.details()
    certify_groups(model, list(s), X)
