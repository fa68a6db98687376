"""Query/key rescale pairs in attention: score(i, j) = sum_c q_{i,c} k_{j,c} per head.

Scaling query channel c by alpha and key channel c by 1/alpha (alpha > 0) leaves every score, hence the
model, unchanged. When both channels are written by parameter slices (a Linear's row and bias entry) and
reach the contraction only through index maps (view, transpose, split of a packed projection) and
positively homogeneous ops (a constant scale, ReLU), that is a rescale group: A1 = the query writer's row
c (+ bias entry), A2 = the key writer's row c (+ bias entry), one per (layer, embedding coordinate).

Derived by hand per model below; every found pair is certified on a float64 copy
(test_detect_support.certify_groups: relative change of loss and outputs <= 1e-9) and checked by brute
force against autograd: <D theta, g> = sum_A1 theta g - sum_A2 theta g = 0 while a random direction on
the same coordinates gives a clearly non-zero product. The counter-examples (cosine attention, a query read
elsewhere, queries that no parameter writes, a frozen key) must have no pair at all; rotary embeddings and a
key shared by several query heads give joint pairs (over the rotary pair of coordinates, over the heads).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from test_detect_support import certify_groups, float64_copy

torch.set_num_threads(1)
E, HEADS, SEQ, CLASSES = 8, 2, 5, 3


def qk_groups(s: SymmetrySet) -> list[Symmetry]:
    """Rescale groups whose members are all rows (dim 0): writers on both sides (query A1, key A2).

    In these models every other rescale group has a reader column (dim 1) as A2, so this picks exactly
    the query/key pairs without relying on names.
    """
    return [g for g in s.filter("rescale") if all(m.dim == 0 for m in g.members)]


def gradient_check(model: nn.Module, groups: list[Symmetry], x: Tensor) -> None:
    """Brute force: <D theta, g> = 0 for every group (autograd gradient, float64); a random D' is not."""
    m = float64_copy(model)
    params = dict(m.named_parameters())
    out = m(x.double() if x.is_floating_point() else x)
    target = torch.arange(out.shape[0]) % out.shape[1]
    raw = torch.autograd.grad(F.cross_entropy(out, target), list(params.values()), allow_unused=True)
    grads = {k: torch.zeros_like(p) if gk is None else gk for (k, p), gk in zip(params.items(), raw, strict=True)}
    gen = torch.Generator().manual_seed(5)
    assert groups
    for g in groups:
        masks = g.masks(params)
        terms = {k: d.double() * params[k].detach() * grads[k] for k, d in masks.items()}
        value = sum(float(t.sum()) for t in terms.values())
        scale = sum(float(t.abs().sum()) for t in terms.values())
        assert scale > 1e-8, f"{g.name}: no gradient on its members, the check would be vacuous"
        assert abs(value) <= 1e-10 * scale, f"{g.name}: <D theta, g> = {value:.3g} (scale {scale:.3g})"
        # a random direction on the same coordinates does not annihilate the gradient
        rand = sum(float((torch.randn(d.shape, generator=gen, dtype=torch.float64) * (d != 0) * grads[k]).sum())
                   for k, d in masks.items())
        norm = math.sqrt(sum(float((grads[k] * (d != 0)).pow(2).sum()) for k, d in masks.items()))
        assert abs(rand) > 1e-3 * norm, f"{g.name}: the random baseline is degenerate"


# ---- nn.MultiheadAttention (the scaled_dot_product_attention path) ---------------------------------
class MHAStack(nn.Module):
    """Two post-residual MHA blocks and a classifier on the token mean."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(E, HEADS, batch_first=True) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(E) for _ in range(layers))
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        for attn, norm in zip(self.attn, self.norm, strict=True):
            h = norm(x)
            x = x + attn(h, h, h, need_weights=False)[0]
        return self.head(x.mean(1))


def test_multihead_attention_pairs_rows_r_and_e_plus_r():
    torch.manual_seed(0)
    m = MHAStack()
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    pairs = qk_groups(s)
    assert len(pairs) == 2 * E  # one per (layer, embedding coordinate)
    for i in range(2):
        w, b = f"attn.{i}.in_proj_weight", f"attn.{i}.in_proj_bias"
        got = {frozenset(g.members) for g in pairs if g.layer == f"attn.{i}"}
        assert got == {frozenset({Member(w, 0, (r,), "in"), Member(b, 0, (r,), "in"),
                                  Member(w, 0, (E + r,), "out"), Member(b, 0, (E + r,), "out")}) for r in range(E)}
    # what was there before stays: the key-bias translations (overlapping the pairs' A2) and the value groups
    key_bias = [g for g in s.filter("translation") if g.members[0].param.endswith("in_proj_bias")]
    assert sorted(g.members[0].index[0] for g in key_bias if g.layer == "attn.0") == list(range(E, 2 * E))
    values = [g for g in s.filter("rescale") if any(mm.param.endswith("out_proj.weight") for mm in g.members)
              and any(mm.param.endswith("in_proj_weight") for mm in g.members)]
    assert len(values) == 2 * E
    assert not any("scaled_dot_product_attention" in k for k in s.meta["blocked_ops"])
    details = pairs[0].details()
    assert "score = sum_c q_c k_c" in details and "scaled_dot_product_attention" in details
    certify_groups(m, pairs, x)
    gradient_check(m, pairs, x)
    report = certify(m, s, x, sample=6)
    assert report.ok, report.summary()


# ---- hand-written attention: separate q / k / v Linear layers -------------------------------------
def rotate_half(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class HandAttention(nn.Module):
    """x -> LayerNorm -> q, k, v Linear -> heads -> F.scaled_dot_product_attention -> o -> mean -> head.

    `mode` inserts what sits between the projections and the contraction:
    plain / scaled (q * 0.5) / relu (q and k through ReLU: positively homogeneous) keep the pairs;
    cosine (F.normalize), rope (rotary embedding: mixes coordinate c with c + d/2), q_read (q also feeds a
    Linear that reaches the output), shared_key (one key head broadcast to every query head), raw_query
    (q is the LayerNorm's output, no parameter writes it), frozen_key (k's Linear is frozen) lose them.
    """

    def __init__(self, mode: str = "plain", e: int = E, heads: int = HEADS, bias: bool = True) -> None:
        super().__init__()
        self.mode, self.e, self.heads = mode, e, heads
        self.d = e // heads
        self.norm = nn.LayerNorm(e, elementwise_affine=False)
        self.q = nn.Linear(e, e, bias=bias)
        self.k = nn.Linear(e, self.d if mode == "shared_key" else e, bias=bias)
        self.v = nn.Linear(e, e)
        self.o = nn.Linear(e, e)
        self.side = nn.Linear(e, e) if mode == "q_read" else None
        self.head = nn.Linear(e, CLASSES)
        if mode == "frozen_key":
            self.k.requires_grad_(False)

    def split(self, t: Tensor) -> Tensor:
        n, length, _ = t.shape
        return t.view(n, length, -1, self.d).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        h = self.norm(x)
        q = h if self.mode == "raw_query" else self.q(h)
        qh, kh, vh = self.split(q), self.split(self.k(h)), self.split(self.v(h))
        if self.mode == "shared_key":
            kh = kh.expand(n, self.heads, length, self.d)
        if self.mode == "scaled":
            qh = qh * 0.5
        if self.mode == "relu":
            qh, kh = F.relu(qh), F.relu(kh)
        if self.mode == "cosine":
            qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
        if self.mode == "rope":
            pos = torch.arange(length, dtype=x.dtype).unsqueeze(-1)
            freq = pos * torch.linspace(0.1, 1.0, self.d // 2, dtype=x.dtype)
            cos, sin = torch.cat([freq.cos()] * 2, -1), torch.cat([freq.sin()] * 2, -1)
            qh, kh = qh * cos + rotate_half(qh) * sin, kh * cos + rotate_half(kh) * sin
        y = F.scaled_dot_product_attention(qh, kh, vh)
        y = self.o(y.transpose(1, 2).reshape(n, length, self.e))
        if self.side is not None:
            y = y + self.side(q)
        return self.head((x + y).mean(1))


@pytest.mark.parametrize("mode", ["plain", "scaled", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_hand_written_attention_pairs_q_row_with_k_row(mode, bias):
    torch.manual_seed(1)
    m = HandAttention(mode, bias=bias)
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    pairs = qk_groups(s)
    assert len(pairs) == E
    expected = set()
    for r in range(E):
        members = {Member("q.weight", 0, (r,), "in"), Member("k.weight", 0, (r,), "out")}
        if bias:
            members |= {Member("q.bias", 0, (r,), "in"), Member("k.bias", 0, (r,), "out")}
        expected.add(frozenset(members))
    assert {frozenset(g.members) for g in pairs} == expected
    assert all(g.layer == "q" for g in pairs)
    certify_groups(m, pairs, x)
    gradient_check(m, pairs, x)


@pytest.mark.parametrize("mode", ["cosine", "q_read", "raw_query", "frozen_key"])
def test_no_pair_when_something_else_touches_q_or_k(mode):
    torch.manual_seed(2)
    m = HandAttention(mode)
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    assert qk_groups(s) == []
    assert not any(mm.param.startswith(("q.", "k.")) and mm.dim == 0
                   for g in s.filter("rescale") for mm in g.members)
    # the value path is untouched by all of this: value channel c is read by o's column c
    assert sum(1 for g in s.filter("rescale") if Member("o.weight", 1, (0,), "out") in g.members) == 1
    certify_groups(m, s, x)


def test_shared_key_head_pairs_with_every_query_head_jointly():
    # multi-query attention: one key head (k: Linear(E, d), d = E / HEADS = 4) broadcast to both query heads.
    # Key coordinate c meets query coordinate c of head 0 (q row c) and of head 1 (q row d + c): scaling both
    # query rows by alpha and key row c by 1/alpha leaves every score of both heads unchanged, while one query
    # head alone cannot be compensated (the key row is shared). So d joint groups:
    # A1 = {q.weight[c], q.bias[c], q.weight[d + c], q.bias[d + c]}, A2 = {k.weight[c], k.bias[c]}.
    torch.manual_seed(2)
    m = HandAttention("shared_key")
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    d = E // HEADS
    pairs = qk_groups(s)
    assert {frozenset(g.members) for g in pairs} == {
        frozenset({Member("q.weight", 0, (c, d + c), "in"), Member("q.bias", 0, (c, d + c), "in"),
                   Member("k.weight", 0, (c,), "out"), Member("k.bias", 0, (c,), "out")}) for c in range(d)}
    assert all("shared by 2 query classes" in "\n".join(g.chain) for g in pairs)
    certify_groups(m, pairs, x)
    gradient_check(m, pairs, x)


def test_rope_pairs_the_rotary_coordinates_jointly():
    # rotary embedding: q' = q cos + rotate_half(q) sin mixes head coordinate c with c + d/2 (d = 4: pairs (0, 2)
    # and (1, 3)), a rotation of the 2-vector (q_c, q_{c+d/2}) that commutes with scaling it. So query rows
    # {h d + c, h d + c + 2} (x alpha) with the same key rows (x 1/alpha) leave every score unchanged:
    # one group per (head, rotary pair), HEADS * d / 2 = 4, never one per single coordinate.
    torch.manual_seed(2)
    m = HandAttention("rope")
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    d = E // HEADS
    rows = [(h * d + c, h * d + c + d // 2) for h in range(HEADS) for c in range(d // 2)]
    assert {frozenset(g.members) for g in qk_groups(s)} == {
        frozenset({Member("q.weight", 0, r, "in"), Member("q.bias", 0, r, "in"),
                   Member("k.weight", 0, r, "out"), Member("k.bias", 0, r, "out")}) for r in rows}
    certify_groups(m, qk_groups(s), x)
    gradient_check(m, qk_groups(s), x)


def test_rope_pairs_would_be_coordinate_mixing():
    # why rope has no pair: rotary embedding mixes q_c with q_{c + d/2}, so scaling one query coordinate
    # alone changes the scores (checked numerically on the model itself)
    torch.manual_seed(3)
    m = HandAttention("rope").double()
    x = torch.randn(3, SEQ, E, dtype=torch.float64)
    out0 = m(x)
    with torch.no_grad():
        m.q.weight[0] *= 2.0
        m.q.bias[0] *= 2.0
        m.k.weight[0] /= 2.0
        m.k.bias[0] /= 2.0
    assert (m(x) - out0).abs().max() > 1e-6


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.integers(1, 3), d=st.integers(1, 3), seq=st.integers(2, 4))
def test_hand_attention_one_pair_per_coordinate(heads, d, seq):
    torch.manual_seed(heads * 10 + d)
    e = heads * d
    m = HandAttention("plain", e=e, heads=heads)
    x = torch.randn(2, seq, e)
    pairs = qk_groups(find_symmetries(m, x))
    assert sorted(next(mm.index[0] for mm in g.members if mm.param == "k.weight") for g in pairs) == list(range(e))
    certify_groups(m, pairs, x)


# ---- Swin-style explicit attention: q * scale @ k^T + relative position bias -> softmax -------------
class WindowAttention(nn.Module):
    """One packed qkv Linear, heads by reshape/permute, scores written out by hand (torchvision Swin V1).

    cosine=True is Swin V2's attention: F.normalize(q) @ F.normalize(k)^T * a learned logit scale.
    """

    def __init__(self, cosine: bool = False) -> None:
        super().__init__()
        self.cosine = cosine
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)
        self.rel = nn.Parameter(torch.randn(HEADS, SEQ, SEQ) * 0.1)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(HEADS, 1, 1)))
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * (E // HEADS) ** -0.5).matmul(k.transpose(-2, -1))
        attn = (attn + self.rel).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, length, E)
        return self.head((x + self.proj(y)).mean(1))


def test_swin_style_explicit_scores_pair_qkv_rows():
    torch.manual_seed(4)
    m = WindowAttention()
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    pairs = qk_groups(s)
    assert {frozenset(g.members) for g in pairs} == {
        frozenset({Member("qkv.weight", 0, (r,), "in"), Member("qkv.bias", 0, (r,), "in"),
                   Member("qkv.weight", 0, (E + r,), "out"), Member("qkv.bias", 0, (E + r,), "out")})
        for r in range(E)}
    assert "aten.matmul" not in s.meta["blocked_ops"]
    assert any("aten.matmul" in step and "score" in step for step in pairs[0].chain)
    # the key-bias translations are still there (E of them) next to the pairs
    assert sum(g.members[0].param == "qkv.bias" for g in s.filter("translation")) == E
    certify_groups(m, pairs, x)
    gradient_check(m, pairs, x)


def test_swin_v2_cosine_attention_has_no_pair():
    torch.manual_seed(5)
    m = WindowAttention(cosine=True)
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    assert qk_groups(s) == []
    assert not any(mm.param == "qkv.weight" and mm.dim == 0 and mm.index[0] < 2 * E
                   for g in s.filter("rescale") for mm in g.members)
    certify_groups(m, s, x)


def test_gram_matrix_of_one_factor_is_no_pair():
    # x @ x^T: query and key are the same channel (scaling it by alpha and by 1/alpha at once is impossible)
    class Gram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(E, E)
            self.head = nn.Linear(SEQ, CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            return self.head((h @ h.transpose(-2, -1)).mean(1))

    torch.manual_seed(6)
    m = Gram()
    x = torch.randn(3, SEQ, E)
    s = find_symmetries(m, x)
    assert qk_groups(s) == [] and not any(g.layer == "a" for g in s.filter("rescale"))
    assert s.meta["blocked_ops"]["aten.matmul"] == 1
    certify_groups(m, s, x)
