"""A Linear whose bias is computed in forward (F.linear(x, W, b) with b an activation): the bias is added to the
output like any activation, so W's rows still write their channels (ops/linear.py `dense`).

Model: b(relu(F.linear(x, a.weight, bias))) with a: 6 -> 8, b: 8 -> 3, softmax over the classes. Derived by hand:
hidden neuron c (a's row c and the bias entry c that reaches it, relu, b's column c): 8 rescale groups when the
bias is a.bias itself, its clone, or a clone with entries zeroed (Swin V2's key part: the zeroed entries do not
move, and 0 times any factor is 0); b's 8 columns and its bias: 9 translations. A bias that is a fixed non-zero
tensor (a buffer) does not scale with a's rows: those hidden neurons are not rescale groups.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_support import certified
from neural_mechanics.symmetry.detect import find_symmetries
from test_detect_support import counts

torch.set_num_threads(1)


class ComputedBias(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("fixed", torch.linspace(0.5, 1.0, 8))

    def forward(self, x):
        if self.kind == "param":
            bias = self.a.bias
        elif self.kind == "clone":
            bias = self.a.bias.clone()
        elif self.kind == "zeroed":
            bias = self.a.bias.clone()
            bias[2:4].zero_()
        else:
            bias = self.fixed
        return self.b(torch.relu(F.linear(x, self.a.weight, bias)))


@pytest.mark.parametrize(("kind", "rescale"), [("param", 8), ("clone", 8), ("zeroed", 8), ("buffer", 0)],
                         ids=["param", "clone", "zeroed", "buffer"])
def test_computed_bias_is_an_added_activation(kind, rescale):
    torch.manual_seed(0)
    m, x = ComputedBias(kind), torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    s = find_symmetries(m, x)
    assert counts(s) == (9, 0, rescale)
    if kind != "buffer":
        (g,) = [g for g in s.filter("rescale") if any(m.param == "a.weight" and m.index == (5,) for m in g.members)]
        assert {(mm.param, mm.index) for mm in g.members} == {("a.weight", (5,)), ("a.bias", (5,)), ("b.weight", (5,))}
    certified(m, s, x, loss="cross_entropy", sample=None)
