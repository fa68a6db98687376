"""LSTM and GRU stay barriers (their gates are sigmoids and tanh: no channel scale passes), and say so.

Model: e = Linear(4, 6) -> ReLU -> LSTM/GRU(6 -> 5) -> last step -> head Linear(5, 3), softmax over classes.
Derived by hand: the head's 5 columns and its bias are translations (6); e's rows feed the recurrent gates,
which are not homogeneous: no rescale group; nothing is normalised: no scale group. The recurrent op must be
named in meta["blocked_ops"] (the coverage report reads it), not silently dropped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neural_mechanics.symmetry.detect import find_symmetries
from test_detect_support import counts

torch.set_num_threads(1)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.e, self.r, self.h = nn.Linear(4, 6), cell(6, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.h(self.r(torch.relu(self.e(x)))[0][:, -1])


@pytest.mark.parametrize(("cell", "op"), [(nn.LSTM, "aten.lstm"), (nn.GRU, "aten.gru")], ids=["lstm", "gru"])
def test_recurrent_layers_are_named_barriers(cell, op):
    torch.manual_seed(0)
    s = find_symmetries(Recurrent(cell), torch.randn(2, 7, 4))
    assert counts(s) == (6, 0, 0)
    assert s.meta["blocked_ops"].get(op) == 1
