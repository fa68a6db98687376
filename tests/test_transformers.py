"""Transformer symmetries: attention key bias, the pre-LN residual stream, the classifier's softmax.

A pre-LN encoder (nn.TransformerEncoderLayer(norm_first=True)) has three families, derived by hand:
- key bias: q_i . (k_j + b) = q_i . k_j + q_i . b is the same for every key j, and the softmax over keys
  ignores a per-query constant, so every coordinate of in_proj_bias[E:2E] is free: one translation group
  per coordinate (its gradient vanishes identically);
- the residual stream x = emb + pos + sum_l (attn_l + mlp_l) is read only by LayerNorms when a final
  LayerNorm sits before the head: scaling every writer of the stream (embedding, positions, out_proj and
  the MLP's second Linear, weights and biases) by alpha changes nothing -> one scale group. Without the
  final LayerNorm the head reads the stream, and the same writers form a rescale group with the head's
  columns as A2;
- the classifier's softmax translation: one group per input column of the head plus its bias.
Every claim is certified by applying the action to a float64 copy (test_detect_support.certify_groups).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member
from test_detect_support import certify_groups

torch.set_num_threads(1)
E, HEADS, LAYERS, VOCAB, CLASSES, SEQ = 8, 2, 2, 11, 3, 5


class PreLN(nn.Module):
    def __init__(self, final_norm: bool = True, activation: str = "gelu") -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E)
        self.pos = nn.Parameter(torch.randn(1, SEQ, E) * 0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0, activation=activation,
                                       batch_first=True, norm_first=True) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(E) if final_norm else nn.Identity()
        self.head = nn.Linear(E, CLASSES)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


def _writers() -> set[str]:
    out = {"emb.weight", "pos"}
    for i in range(LAYERS):
        out |= {f"layers.{i}.self_attn.out_proj.weight", f"layers.{i}.self_attn.out_proj.bias",
                f"layers.{i}.linear2.weight", f"layers.{i}.linear2.bias"}
    return out


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))


def test_key_bias_is_a_translation_in_every_direction(tokens):
    torch.manual_seed(0)
    m = PreLN()
    s = find_symmetries(m, tokens)
    key = [g for g in s.filter("translation") if "in_proj_bias" in g.members[0].param]
    assert len(key) == LAYERS * E
    for i in range(LAYERS):
        idx = sorted(g.members[0].index[0] for g in key if g.layer == f"layers.{i}.self_attn")
        assert idx == list(range(E, 2 * E))  # the key slice, never a query or value coordinate
    # brute force: the gradient of the loss w.r.t. the key bias is zero (autograd), the query bias's is not
    out = m(tokens)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]))
    (g,) = torch.autograd.grad(loss, [m.layers[0].self_attn.in_proj_bias])
    assert g[E : 2 * E].abs().max() < 1e-7 and g[:E].abs().max() > 1e-5
    certify_groups(m, key, tokens)
    # the values: once the attention weights are fixed the output is linear in v, so value channel i
    # (in_proj rows 2E + i and bias) is read by out_proj's column i
    attn = [g for g in s.filter("rescale") if g.layer == "layers.0.self_attn"]
    value = [g for g in attn if any(mm.param.endswith("out_proj.weight") for mm in g.members)]
    assert len(value) == E
    assert set(value[1].members) == {Member("layers.0.self_attn.in_proj_weight", 0, (2 * E + 1,), "in"),
                                     Member("layers.0.self_attn.in_proj_bias", 0, (2 * E + 1,), "in"),
                                     Member("layers.0.self_attn.out_proj.weight", 1, (1,), "out")}
    certify_groups(m, value, tokens)
    # queries and keys: score = sum_c q_c k_c per head, so query row r (x alpha) pairs with key row E + r
    # (x 1/alpha), weights and biases: E more rescale groups per layer, A2 overlapping the key-bias translations
    pairs = [g for g in attn if g not in value]
    assert len(pairs) == E
    w, b = "layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias"
    assert {frozenset(g.members) for g in pairs} == {
        frozenset({Member(w, 0, (r,), "in"), Member(b, 0, (r,), "in"), Member(w, 0, (E + r,), "out"),
                   Member(b, 0, (E + r,), "out")}) for r in range(E)}
    certify_groups(m, pairs, tokens)


def test_pre_ln_stream_is_one_scale_group(tokens):
    torch.manual_seed(1)
    m = PreLN()
    s = find_symmetries(m, tokens)
    (stream,) = [g for g in s.filter("scale") if "emb.weight" in g.params]
    assert set(stream.params) == _writers()
    assert all(mm.role is None for mm in stream.members)
    chain = "\n".join(stream.details().splitlines())
    assert "layer_norm" in chain and "sums two branches" in chain  # why: residual adds, LayerNorm readers
    # softmax translation of the classifier
    assert sum(g.layer == "head" for g in s.filter("translation")) == E + 1
    certify_groups(m, [stream, *s.filter("translation")], tokens)
    report = certify(m, s, tokens, sample=8)
    assert report.ok, report.summary()


def test_without_final_norm_the_head_reads_the_stream(tokens):
    torch.manual_seed(2)
    m = PreLN(final_norm=False)
    s = find_symmetries(m, tokens)
    # not a scale symmetry any more (the head reads the stream): a rescale with the head's columns as A2
    assert not any("emb.weight" in g.params for g in s.filter("scale"))
    (stream,) = [g for g in s.filter("rescale") if "emb.weight" in g.params]
    assert {mm.param for mm in stream.members if mm.role == "in"} == _writers()
    assert {mm for mm in stream.members if mm.role == "out"} == {Member("head.weight", 1, tuple(range(E)), "out")}
    certify_groups(m, [stream], tokens)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_mlp_hidden_neurons_rescale_only_through_relu(tokens, activation):
    torch.manual_seed(3)
    m = PreLN(activation=activation)
    s = find_symmetries(m, tokens)
    hidden = [g for g in s.filter("rescale") if g.layer == "layers.0.linear1"]
    assert len(hidden) == (16 if activation == "relu" else 0)
    if hidden:
        assert set(hidden[0].members) == {Member("layers.0.linear1.weight", 0, (0,), "in"),
                                          Member("layers.0.linear1.bias", 0, (0,), "in"),
                                          Member("layers.0.linear2.weight", 1, (0,), "out")}
        certify_groups(m, hidden, tokens)
