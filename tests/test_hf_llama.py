"""LLaMA, Qwen2, Mistral (transformers): RMSNorm, SwiGLU, rotary embeddings, grouped- and multi-query attention.

Tiny config (all three): 2 layers, hidden E = 16, 4 query heads of head dim 4, intermediate I = 24 (SwiGLU:
down(silu(gate(x)) * up(x))), vocab 50, no MLP biases. LLaMA and Mistral: 2 key/value heads (GQA: key head j
serves query heads 2j, 2j + 1), no attention biases; Qwen2: 1 key/value head (MQA) and biases on q, k, v.
Mistral: a sliding window of 4 over 8 tokens. Token-level cross-entropy.

Derived by hand, per layer, with KV key/value heads:
- input_layernorm's weight[d] (an RMS norm written out: pow / mean / rsqrt) -> q, k, v's column d: E rescale;
  post_attention_layernorm's weight[d] -> gate's and up's column d: E rescale;
- SwiGLU: silu(gate) * up is linear in up, so up's row j (x alpha) with down's column j (x 1/alpha): I rescale
  (gate's rows: silu is not homogeneous, none);
- values: v's row c (key/value head c // 4, coordinate c % 4) is read by o's column h * 4 + c % 4 of every query
  head h it serves: KV * 4 rescale;
- query/key pairs: the rotary embedding mixes coordinates c and c + 2 of a head (a rotation of that pair), and
  a key head is shared by 16 / (4 KV) query heads: one joint group per (key head, rotary pair), A1 = the query
  rows {h * 4 + c, h * 4 + c + 2} of every query head h it serves (+ biases), A2 = key rows {j * 4 + c,
  j * 4 + c + 2} (+ biases): KV * 2; a single coordinate or a single query head is never a group;
- no key-bias translation (Qwen2's k bias is rotated with the keys: not constant over positions).
Per layer 2E + I + 4 KV + 2 KV = 56 + 6 KV. The residual stream (embed_tokens' columns, o's and down's rows) is
read only by RMS norms: 1 scale group; the final norm's weight[d] -> lm_head's column d: E rescale, and the
head's translations: E columns (no bias). Untied: (E, 1, 2 (56 + 6 KV) + E). Tied: the stream and the final
norm's E groups merge into one rescale group, no translations: (0, 0, 2 (56 + 6 KV) + 1).
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
E, I, LAYERS, HEADS, D = 16, 24, 2, 4, 4


def build(family: str, kv: int, tied: bool = False, attn: str = "sdpa", **extra):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=LAYERS, hidden_size=E, num_attention_heads=HEADS, num_key_value_heads=kv,
                  intermediate_size=I, vocab_size=VOCAB, max_position_embeddings=16, tie_word_embeddings=tied,
                  attn_implementation=attn, **SPECIAL, **{"use_cache": False, **extra})
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    return model_cls(cfg_cls(**common)).train()


def expected(kv: int, tied: bool) -> tuple[int, int, int]:
    per_layer = 2 * E + I + 4 * kv + 2 * kv
    return (0, 0, LAYERS * per_layer + 1) if tied else (E, 1, LAYERS * per_layer + E)


def qk_pairs(s):
    return [g for g in s.filter("rescale") if "~" in g.name]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gqa(tied, attn):
    m, x = build("llama", kv=2, tied=tied, attn=attn), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == expected(2, tied), s.meta["blocked_ops"]
    p = "model.layers.0."
    # key head 1 serves query heads 2 and 3; rotary pair (0, 2): query rows 8, 10, 12, 14 with key rows 4, 6
    pair = next(g for g in qk_pairs(s) if Member(f"{p}self_attn.k_proj.weight", 0, (4, 6), "out") in g.members)
    assert set(pair.members) == {Member(f"{p}self_attn.q_proj.weight", 0, (8, 10, 12, 14), "in"),
                                 Member(f"{p}self_attn.k_proj.weight", 0, (4, 6), "out")}
    assert len(qk_pairs(s)) == LAYERS * 2 * 2
    # value row 5 (key/value head 1, coordinate 1) is read by o's columns 9 and 13 (query heads 2 and 3)
    assert set(s[f"rescale:{p}self_attn.v_proj[5]"].members) == {
        Member(f"{p}self_attn.v_proj.weight", 0, (5,), "in"), Member(f"{p}self_attn.o_proj.weight", 1, (9, 13), "out")}
    # SwiGLU: up's row j with down's column j; gate's rows are in no group (its columns read the norm's features)
    assert set(s[f"rescale:{p}mlp.up_proj[7]"].members) == {
        Member(f"{p}mlp.up_proj.weight", 0, (7,), "in"), Member(f"{p}mlp.down_proj.weight", 1, (7,), "out")}
    assert not any(mm.param == f"{p}mlp.gate_proj.weight" and mm.dim != 1 for g in s for mm in g.members)
    # the hand-written RMS norm: its weight writes feature d, read by q, k, v's column d
    assert set(s[f"rescale:{p}input_layernorm[3]"].members) == {
        Member(f"{p}input_layernorm.weight", 0, (3,), "in"),
        *(Member(f"{p}self_attn.{w}_proj.weight", 1, (3,), "out") for w in "qkv")}
    assert "aten.pow" not in s.meta["blocked_ops"] and set(s.meta["blocked_ops"]) <= {"aten.silu", "aten.log_softmax"}
    if tied:
        (joint,) = [g for g in s if "model.embed_tokens.weight" in g.params]
        assert params_of([joint], "out") == {"model.norm.weight"}
    else:
        (stream,) = s.filter("scale")
        assert set(stream.params) >= {"model.embed_tokens.weight", f"{p}self_attn.o_proj.weight",
                                 f"{p}mlp.down_proj.weight"}
    certified(m, s, x, sample=12)
    # one query head alone with its key rows is not a symmetry (the key head is shared): rejected
    q, k = f"{p}self_attn.q_proj.weight", f"{p}self_attn.k_proj.weight"
    assert_rejected(m, Symmetry("rescale", "one-head", (Member(q, 0, (8, 10), "in"), Member(k, 0, (4, 6), "out")),
                                p), x)
    # a single rotary coordinate (not its pair) is not a symmetry either
    assert_rejected(m, Symmetry("rescale", "one-coordinate", (Member(q, 0, (8, 12), "in"), Member(k, 0, (4,), "out")),
                                p), x)


def test_qwen2_mqa_with_qkv_biases():
    m, x = build("qwen2", kv=1), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == expected(1, False)
    p = "model.layers.1.self_attn."
    # the one key head serves all 4 query heads: rotary pair (1, 3) -> query rows h * 4 + {1, 3}, biases included
    rows = (1, 3, 5, 7, 9, 11, 13, 15)
    pair = next(g for g in qk_pairs(s) if Member(f"{p}k_proj.weight", 0, (1, 3), "out") in g.members)
    assert set(pair.members) == {
        Member(f"{p}q_proj.weight", 0, rows, "in"), Member(f"{p}q_proj.bias", 0, rows, "in"),
        Member(f"{p}k_proj.weight", 0, (1, 3), "out"), Member(f"{p}k_proj.bias", 0, (1, 3), "out")}
    assert set(s[f"rescale:{p}v_proj[2]"].members) == {
        Member(f"{p}v_proj.weight", 0, (2,), "in"), Member(f"{p}v_proj.bias", 0, (2,), "in"),
        Member(f"{p}o_proj.weight", 1, (2, 6, 10, 14), "out")}
    # no key-bias translation under the rotary embedding; the only translations are lm_head's columns
    assert {g.layer for g in s.filter("translation")} == {"lm_head"}
    certified(m, s, x, sample=12)
    # a key-bias translation would not be a symmetry here (the rotated bias differs per position): rejected
    assert_rejected(m, Symmetry("translation", "key-bias", (Member(f"{p}k_proj.bias", 0, (0,)),), p), x)


def test_mistral_sliding_window():
    m, x = build("mistral", kv=2, sliding_window=4), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == expected(2, False)
    certified(m, s, x, sample=12)


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 1), (2, 5)], ids=["1x1", "2x1", "2x5"])
def test_grouped_query_attention_in_every_form(batch, seq):
    # sdpa with enable_gqa (the cache path), one-token queries folded into the token axis, and repeat_kv: the same
    # groups everywhere (raised a RuntimeError before: the value labels kept 2 heads where the output has 4)
    m = build("llama", kv=2, use_cache=True) if seq > 1 else build("llama", kv=2)
    x = tokens(batch, seq)
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == expected(2, False)
    certified(m, s, x, sample=6)
