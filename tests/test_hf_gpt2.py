"""GPT-2 (transformers' GPT2LMHeadModel): Conv1D = addmm, tied embeddings, LayerNorm -> Conv1D, causal attention.

Tiny config: 2 layers, n_embd E = 16, 2 heads (head dim 8), vocab 50, n_positions 16, MLP width 4 E = 64 with
gelu_new (tanh approximation: a barrier). Token-level cross-entropy (softmax over the vocabulary axis).

Derived by hand, per layer (Conv1D stores W as (in, out): row k reads input feature k, column c writes c):
- ln_1's affine feature d -> c_attn's row d (read by q, k and v): E rescale groups; ln_2 -> c_fc's row d: E;
- values: c_attn column 2E + c (+ bias) -> attention (weights fixed, linear in v) -> attn.c_proj's row c: E;
- query/key pairs: c_attn column c (+ bias) x alpha with column E + c (+ bias) x 1/alpha: E (one per
  coordinate: no rotary embedding, as many key heads as query heads);
- key-bias translations: c_attn.bias[E + c] adds the same vector to every key, q . b is constant over the
  keys of a query, and the causal mask only adds a constant per (query, key) position: E translation groups.
So 4 E rescale + E translation per layer: 128 rescale and 32 translation for 2 layers.
The residual stream (wte's columns, wpe's columns, both c_proj's columns and biases of every layer) is read only
by LayerNorms: a scale group, untied. ln_f's affine feature d is read by the head's column d: E rescale, and
the head's softmax translations: E columns (no bias).
Tied (GPT-2's default, lm_head.weight is wte.weight): wte's column d writes the stream AND reads ln_f's feature d,
so the stream's scale and ln_f's E groups merge into ONE rescale group (A1 = the stream's writers, A2 = ln_f's
weight and bias), and the head's translations go (ties.py). Tied: (32, 0, 128 + 1); untied: (48, 1, 144).
"""

from __future__ import annotations

import pytest
import torch

from hf_support import SPECIAL, TOKENS, VOCAB, assert_rejected, certified, params_of, tokens
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry
from test_detect_support import counts

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
E, LAYERS = 16, 2


def gpt2(tied: bool = True, attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=LAYERS, n_embd=E, n_head=2, vocab_size=VOCAB, n_positions=16,
                                  use_cache=False, tie_word_embeddings=tied, attn_implementation=attn, **SPECIAL)
    return transformers.GPT2LMHeadModel(cfg).train()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_tied(attn):
    m, x = gpt2(attn=attn), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == (LAYERS * E, 0, LAYERS * 4 * E + 1), s.meta["blocked_ops"]
    h0 = "transformer.h.0."
    # Conv1D (addmm) pair of coordinate 3: columns 3 (query) and E + 3 (key), with their biases
    assert s[f"rescale:{h0}attn.c_attn[3]~{h0}attn.c_attn[19]"].members == (
        Member(f"{h0}attn.c_attn.weight", 1, (3,), "in"), Member(f"{h0}attn.c_attn.bias", 0, (3,), "in"),
        Member(f"{h0}attn.c_attn.weight", 1, (19,), "out"), Member(f"{h0}attn.c_attn.bias", 0, (19,), "out"))
    # LayerNorm affine -> Conv1D row; value column -> c_proj row
    assert set(s[f"rescale:{h0}ln_1[5]"].members) == {
        Member(f"{h0}ln_1.weight", 0, (5,), "in"), Member(f"{h0}ln_1.bias", 0, (5,), "in"),
        Member(f"{h0}attn.c_attn.weight", 0, (5,), "out")}
    assert set(s[f"rescale:{h0}attn.c_attn[34]"].members) == {
        Member(f"{h0}attn.c_attn.weight", 1, (34,), "in"), Member(f"{h0}attn.c_attn.bias", 0, (34,), "in"),
        Member(f"{h0}attn.c_proj.weight", 0, (2,), "out")}
    # key-bias translations: exactly the key slice of c_attn.bias
    key_bias = [g for g in s.filter("translation") if g.layer == f"{h0}attn.c_attn"]
    assert sorted(g.members[0].index[0] for g in key_bias) == list(range(E, 2 * E))
    # the tie: one rescale group joins the stream's writers (A1) and ln_f's affine (A2)
    (joint,) = [g for g in s if "transformer.wte.weight" in g.params]
    stream = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{p}.c_proj.{w}" for i in range(LAYERS) for p in ("attn", "mlp") for w in ("weight", "bias")}
    assert params_of([joint], "in") == stream
    assert params_of([joint], "out") == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert s.meta["tied"] == {"transformer.wte.weight": "joint over all uses"}
    assert any("tied" in w for w in s.meta["warnings"])
    assert "aten.addmm" not in s.meta["blocked_ops"]
    certified(m, s, x, sample=16)
    # a wrong pairing (query column 3 with key column E + 4) is rejected at the generic point
    assert_rejected(m, Symmetry("rescale", "wrong", (
        Member(f"{h0}attn.c_attn.weight", 1, (3,), "in"), Member(f"{h0}attn.c_attn.weight", 1, (20,), "out")),
        f"{h0}attn.c_attn"), x)


def test_gpt2_untied():
    m, x = gpt2(tied=False), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == (LAYERS * E + E, 1, LAYERS * 4 * E + E)
    (stream,) = s.filter("scale")
    assert "transformer.wte.weight" in stream.params and "lm_head.weight" not in stream.params
    assert sorted(g.members[0].index[0] for g in s.filter("translation") if g.layer == "lm_head") == list(range(E))
    assert s.meta["tied"] == {}
    certified(m, s, x, sample=16)
