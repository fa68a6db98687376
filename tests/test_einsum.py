"""einsum contractions: rewritten at capture onto linear / matmul (symmetry/einsum.py), so they are no barrier.

Reference: the same model written with F.linear / matmul (the rules' home ground) gives the same groups, and the
rewrite computes what torch.einsum computes.

The model (width 6 in, 2 heads of 4 = 8, 3 classes, softmax over the last axis of (B, T, 3)):
h = relu(a(x)) + attention(q(x), k(x), v(x)); logits = b(h). Derived by hand:
- stream channel c of h (8): a's row c (+ bias) and v's row c (+ bias; the attention weights do not move, the
  output is linear in v) are united by the add, relu keeps the channel, b's column c reads it: 8 rescale groups;
- query/key pairs (q's row c with k's row c, + biases; no rotary): 8 rescale groups;
- translations: b's 8 columns and its bias (the softmax head), k's bias per coordinate (q . b is constant over
  the keys of a query): 9 + 8 = 17.
So (17, 0, 16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_support import certified
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.einsum import einsum_as_matmul
from neural_mechanics.symmetry.loss import LossSpec
from test_detect_support import counts

torch.set_num_threads(1)
TOKENS = LossSpec.cross_entropy(class_dim=-1)


class Block(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.a_t = nn.Parameter(torch.randn(6, 8) * 0.4)  # the "io" form: a weight stored (in, out)

    def forward(self, x):
        bsz, t, _ = x.shape
        q, k, v = (lin(x).view(bsz, t, 2, 4) for lin in (self.q, self.k, self.v))
        if self.form == "matmul":
            att = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).softmax(-1)
            o = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(bsz, t, 8)
            pre = F.linear(x, self.a.weight)
        else:
            att = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
            o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, t, 8)
            pre = (torch.einsum("bti,oi->bto", x, self.a.weight) if self.form == "oi"
                   else torch.einsum("bti,io->bto", x, self.a_t))
        return self.b(torch.relu(pre + self.a.bias) + o)


def test_einsum_computes_what_torch_computes():
    gen = torch.Generator().manual_seed(0)
    cases = [("bti,oi->bto", (2, 5, 6), (8, 6)), ("bti,io->tbo", (2, 5, 6), (6, 8)),
             ("bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 7, 3, 4)), ("bhqk,bkhd->bqhd", (2, 3, 5, 7), (2, 7, 3, 4)),
             ("bi,bi->b", (4, 6), (4, 6)), ("ij,jk->ik", (3, 4), (4, 5))]
    for eq, sa, sb in cases:
        a, b = torch.randn(sa, generator=gen, dtype=torch.float64), torch.randn(sb, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(einsum_as_matmul(eq, [a, b]), torch.einsum(eq, a, b), msg=eq)


@pytest.mark.parametrize("form", ["oi", "io"])
def test_einsum_attention_and_dense_layers_are_followed(form):
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ref = find_symmetries(Block("matmul"), x, loss=TOKENS)
    torch.manual_seed(0)
    m = Block(form)
    s = find_symmetries(m, x, loss=TOKENS)
    assert "aten.einsum" not in s.meta["blocked_ops"]
    if form == "oi":  # the same parameters as the reference: the same groups, name by name
        assert counts(ref) == counts(s) == (17, 0, 16)
        assert sorted(g.name for g in s) == sorted(g.name for g in ref)
    else:  # a_t (in, out) replaces a.weight: its column c writes stream channel c
        assert counts(s) == (17, 0, 16)
        assert any(mm.param == "a_t" and mm.dim == 1 for g in s.filter("rescale") for mm in g.members)
    certified(m, s, x, loss=TOKENS, sample=None)


def test_other_einsums_are_lowered_soundly():
    # a 3-operand einsum (a bilinear form): not a dense layer nor a batched product; torch's decomposition lowers it
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.w = nn.Linear(4, 5), nn.Parameter(torch.randn(3, 5, 5))

        def forward(self, x):
            h = self.u(x)
            return torch.einsum("bi,kij,bj->bk", h, self.w, h)

    m, x = Bilinear(), torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    s = find_symmetries(m, x)
    assert "aten.einsum" not in s.meta["blocked_ops"]
    # whatever the lowered pieces yield must hold (u's rows enter quadratically: no per-row rescale exists)
    assert not any(mm.param == "u.weight" for g in s.filter("rescale") for mm in g.members)
    if len(s):
        certified(m, s, x, loss="cross_entropy", sample=None)
