"""Tied parameters (symmetry/ties.py): one tensor used by two ops moves jointly, or not at all.

The model is a tiny language model whose head reuses the embedding table (`F.linear(h, emb.weight)`), the
tie of GPT-2, BERT and T5. Counts are derived by hand in each test; every group is certified on a float64
copy (test_detect_support.certify_groups with the token-level loss) and a wrong group is rejected.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.graph import INVARIANT, UnionFind
from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.symmetry.loss import LossSpec
from test_detect_support import counts

torch.set_num_threads(1)
V, E, H, T = 11, 6, 5, 4
TOKENS = LossSpec.cross_entropy(class_dim=-1)


class TiedLM(nn.Module):
    """embedding -> one pre-LN ReLU MLP block -> (final LayerNorm) -> logits = h @ emb.weight^T (tied) or a head."""

    def __init__(self, final_norm: bool = True, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.norm1 = nn.LayerNorm(E)
        self.fc1, self.fc2 = nn.Linear(E, H), nn.Linear(H, E)
        self.norm = nn.LayerNorm(E) if final_norm else None
        self.head = None if tied else nn.Linear(E, V, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.emb(t)
        x = x + self.fc2(F.relu(self.fc1(self.norm1(x))))
        h = x if self.norm is None else self.norm(x)
        return F.linear(h, self.emb.weight) if self.head is None else self.head(h)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(0))


def _certify(model: nn.Module, groups, tokens: torch.Tensor) -> None:
    with torch.no_grad():  # a generic point: every parameter O(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    report = certify(model, groups, tokens, loss=TOKENS, sample=None, tol=1e-10)
    assert report.ok, report.summary()


def test_signed_union_find():
    uf = UnionFind()
    a, b, c, d = (uf.new(1) for _ in range(4))
    uf.union(a, b)
    assert uf.find_parity(b) == (uf.find(a), 0) and not uf.signed
    uf.union(b, c, anti=True)  # c scales by the inverse of b's (= a's) factor
    assert uf.find_parity(c)[1] != uf.find_parity(a)[1]
    uf.union(c, d)  # d with c: inverse of a
    assert uf.find_parity(d)[1] == uf.find_parity(c)[1] != uf.find_parity(b)[1]
    uf.union(a, d, anti=True)  # consistent with what is known: nothing changes
    assert not uf.tainted(a)
    uf.union(a, d)  # a = d would need alpha = 1/alpha: only alpha = 1 is left, the class is tainted
    assert all(uf.tainted(x) for x in (a, b, c, d)) and uf.find(a) == INVARIANT


def test_tied_head_joins_stream_and_final_norm(tokens):
    torch.manual_seed(0)
    m = TiedLM()
    s = find_symmetries(m, tokens, loss=TOKENS)
    # by hand: norm1's affine feature d -> fc1's column d (E rescale), hidden neuron j through ReLU (H rescale).
    # The stream (written by emb's columns and fc2) is normalised away by norm1 and norm, but emb's column d also
    # reads norm's feature d in the head: scaling the stream by alpha needs norm's weight and bias by 1/alpha.
    # So the stream's scale group and norm's E affine -> head rescale groups merge into ONE rescale group; the
    # head's translations go (adding to a column of emb.weight would shift the stream too). (0, 0, E + H + 1).
    assert counts(s) == (0, 0, E + H + 1)
    (joint,) = [g for g in s if "emb.weight" in g.params]
    assert joint.kind == "rescale"
    assert {mm.param for mm in joint.members if mm.role == "in"} == {"emb.weight", "fc2.weight", "fc2.bias"}
    assert {mm.param for mm in joint.members if mm.role == "out"} == {"norm.weight", "norm.bias"}
    assert s.meta["shared"] == ["emb.weight"] and s.meta["tied"] == {"emb.weight": "joint over all uses"}
    assert any("tied" in w and "translation" in w for w in s.meta["warnings"])
    assert any("is tied" in step for step in joint.chain)
    _certify(m, s, tokens)
    # the same groups without the tie: 1 stream scale group, E head rescale groups, E head translations
    u = find_symmetries(TiedLM(tied=False), tokens, loss=TOKENS)
    assert counts(u) == (E, 1, E + H + E)


def test_wrong_orientation_of_the_tie_is_rejected(tokens):
    # the same members with norm's affine scaled along with the stream (both by alpha) is not a symmetry
    torch.manual_seed(1)
    m = TiedLM()
    (joint,) = [g for g in find_symmetries(m, tokens, loss=TOKENS) if "emb.weight" in g.params]
    stream = [Member(mm.param, mm.dim, mm.index, "in") for mm in joint.members if mm.param != "emb.weight"]
    wrong = Symmetry("rescale", "wrong", (*stream, Member("emb.weight", None, None, "out")), "x")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    assert not certify(m, [wrong], tokens, loss=TOKENS, sample=None).ok


def test_tie_that_needs_alpha_equal_one_over_alpha_blocks(tokens):
    # no final norm: emb's columns write the stream and read it again in the head (alpha_S = 1/alpha_S), so the
    # stream cannot move; the norm1 -> fc1 and hidden-neuron groups remain: (0, 0, E + H)
    torch.manual_seed(2)
    m = TiedLM(final_norm=False)
    s = find_symmetries(m, tokens, loss=TOKENS)
    assert counts(s) == (0, 0, E + H)
    assert "emb.weight" not in {mm.param for g in s for mm in g.members}
    assert s.meta["tied"]["emb.weight"].startswith("blocked")
    _certify(m, s, tokens)
