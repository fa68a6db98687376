"""BERT, DistilBERT (post-LN encoders) and T5 (encoder-decoder, RMS norms, relative attention bias).

Tiny configs: hidden E = 16, 2 layers, 2 heads (head dim 8), feed-forward width F = 24, vocab 50, 8 tokens.

BERT / DistilBERT (post-LN: x = LN(x + sublayer(x)), GELU feed-forward), derived by hand:
- the embedding sum (word + position [+ token type] embeddings' columns) is read only by the embedding LayerNorm;
- per layer, the stream entering attention (the previous LayerNorm's affine, tied by the residual add to the
  attention output Linear, and normalised jointly by the next LayerNorm) is read by q, k, v's columns: ONE
  rescale group (A1 = that affine + the attention output Linear, A2 = q, k, v's columns); the same for the stream
  entering the feed-forward (A1 = the attention LayerNorm's affine + the feed-forward output Linear, A2 = the
  first feed-forward Linear's columns): 2 per layer;
- values (v's row c -> the attention output Linear's column c): E; query/key pairs (q's row c with k's row c,
  biases included): E; key-bias translations (k's bias): E -- per layer;
- the last LayerNorm's affine feature d is read by the head's first Linear (MLM transform, or the pooler) column d:
  E rescale.
MaskedLM (tied decoder = word embeddings, plus its own bias): the transform is dense -> GELU -> LayerNorm; the
decoder's column d reads that LayerNorm's feature d, and the word embeddings' column d writes the embedding sum:
the embedding sum's scale group and the transform LayerNorm's E affine -> decoder groups merge into one rescale
group; the decoder's bias is a translation, its (tied) columns are not.
  translation 2 E + 1 = 33, scale 0, rescale 4 + E + 2 E + 2 E + 1 = 85.
SequenceClassification (BERT): pooler = dense -> tanh on the first token, classifier Linear(E, 3):
  translation 2 E + E + 1 = 49, scale 1 (the embedding sum), rescale 4 + E + 4 E = 84.

T5 (v1.0: RMS norms without mean nor bias, ReLU feed-forward, no biases at all, relative attention bias added to
the scores, the decoder output scaled by E^-0.5 and read by the tied head = `shared`), derived by hand:
- encoder block: self-attention norm -> q, k, v columns (E), values (E), pairs (E), feed-forward norm -> wi
  columns (E), hidden neurons wi row -> ReLU -> wo column (F): 4 E + F; decoder block: self-attention 3 E,
  cross-attention (its norm -> q columns: E, values: E, pairs of the decoder's q with k on the encoder output: E)
  and feed-forward E + F: 7 E + F; the encoder's final norm feature d -> every cross-attention's k and v column d: E;
- `shared` writes both streams (encoder and decoder embeddings) and reads the decoder's final norm in the head:
  the two streams and that norm's affine form ONE rescale group (A1 = the streams' writers, A2 = the decoder's
  final norm); no translation (no bias, tied head); the relative attention bias is added to the scores, which a
  softmax reads: it cannot scale (blocked).
  translation 0, scale 0, rescale 2 (4 E + F) + 2 (7 E + F) + E + 1 = 465.
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
E, F, LAYERS = 16, 24, 2


def bert(kind: str = "mlm"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=LAYERS, hidden_size=E, num_attention_heads=2, intermediate_size=F,
                                  vocab_size=VOCAB, max_position_embeddings=16, num_labels=3, pad_token_id=2)
    cls = transformers.BertForMaskedLM if kind == "mlm" else transformers.BertForSequenceClassification
    return cls(cfg).train()


def test_bert_masked_lm_tied():
    m, x = bert(), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == (2 * E + 1, 0, 4 + E + 4 * E + 1), s.meta["blocked_ops"]
    layer = "bert.encoder.layer.1."
    # post-LN: the stream entering layer 1's attention is written by layer 0's output LayerNorm and layer 1's
    # attention output Linear (residual add), normalised by layer 1's attention LayerNorm, read by q, k, v
    (pre_attn,) = [g for g in s.filter("rescale") if f"{layer}attention.output.dense.weight" in params_of([g], "in")]
    assert params_of([pre_attn], "in") == {
        "bert.encoder.layer.0.output.LayerNorm.weight", "bert.encoder.layer.0.output.LayerNorm.bias",
        f"{layer}attention.output.dense.weight", f"{layer}attention.output.dense.bias"}
    assert params_of([pre_attn], "out") == {f"{layer}attention.self.{w}.weight" for w in ("query", "key", "value")}
    key_bias = [g for g in s.filter("translation") if g.layer == f"{layer}attention.self.key"]
    assert sorted(g.members[0].index[0] for g in key_bias) == list(range(E))
    # the tie: the embedding sum's writers with the transform LayerNorm's affine; the decoder bias translates
    (joint,) = [g for g in s if "bert.embeddings.word_embeddings.weight" in g.params]
    assert params_of([joint], "out") == {"cls.predictions.transform.LayerNorm.weight",
                                         "cls.predictions.transform.LayerNorm.bias"}
    assert "bert.embeddings.position_embeddings.weight" in params_of([joint], "in")
    head = [g.members for g in s.filter("translation") if g.layer.startswith("cls")]
    assert head == [(Member("cls.predictions.bias"),)]
    certified(m, s, x, sample=12)
    q = f"{layer}attention.self."
    assert_rejected(m, Symmetry("rescale", "wrong-pair", (Member(f"{q}query.weight", 0, (1,), "in"),
                                                          Member(f"{q}key.weight", 0, (2,), "out")), q), x)


def test_bert_sequence_classification():
    m, x = bert("cls"), tokens()
    s = find_symmetries(m, x)  # (B, 3) logits: the default class axis 1
    assert counts(s) == (3 * E + 1, 1, 4 + E + 4 * E)
    (emb,) = s.filter("scale")
    assert params_of([emb]) == {f"bert.embeddings.{n}_embeddings.weight" for n in ("word", "position", "token_type")}
    assert len([g for g in s.filter("rescale") if "bert.pooler.dense.weight" in params_of([g], "out")]) == E
    certified(m, s, x, loss="cross_entropy", sample=12)


def test_distilbert_masked_lm_tied():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(n_layers=LAYERS, dim=E, n_heads=2, hidden_dim=F, vocab_size=VOCAB,
                                        max_position_embeddings=16, pad_token_id=2)
    m, x = transformers.DistilBertForMaskedLM(cfg).train(), tokens()
    s = find_symmetries(m, x, loss=TOKENS)
    assert counts(s) == (2 * E + 1, 0, 4 + E + 4 * E + 1)
    assert s.meta["tied"] == {"distilbert.embeddings.word_embeddings.weight": "joint over all uses"}
    certified(m, s, x, sample=12)


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_t5(ffn):
    torch.manual_seed(0)
    cfg = transformers.T5Config(num_layers=LAYERS, num_decoder_layers=LAYERS, d_model=E, d_kv=8, num_heads=2, d_ff=F,
                                vocab_size=VOCAB, use_cache=False, feed_forward_proj=ffn, decoder_start_token_id=0,
                                **SPECIAL)
    m = transformers.T5ForConditionalGeneration(cfg).train()
    x = (tokens(), None, tokens(seed=1))  # forward(input_ids, attention_mask, decoder_input_ids)
    s = find_symmetries(m, x, loss=TOKENS)
    # gated-gelu (T5 v1.1): wo(gelu(wi_0 x) * wi_1 x): wi_1's row j with wo's column j, the same count as ReLU's
    assert counts(s) == (0, 0, LAYERS * (4 * E + F) + LAYERS * (7 * E + F) + E + 1), s.meta["blocked_ops"]
    enc, dec = "encoder.block.0.layer.", "decoder.block.1.layer."
    # the T5LayerNorm (an RMS norm written out) writes feature d, read by q, k, v's column d
    assert set(s[f"rescale:{enc}0.layer_norm[4]"].members) == {
        Member(f"{enc}0.layer_norm.weight", 0, (4,), "in"),
        *(Member(f"{enc}0.SelfAttention.{w}.weight", 1, (4,), "out") for w in "qkv")}
    # cross-attention pairs the decoder's query row c with the key row c read from the encoder output
    cross = f"{dec}1.EncDecAttention"
    assert set(s[f"rescale:{cross}.q[5]~{cross}.k[5]"].members) == {
        Member(f"{cross}.q.weight", 0, (5,), "in"), Member(f"{cross}.k.weight", 0, (5,), "out")}
    # the encoder's final norm is read by both decoder blocks' cross-attention k and v
    final = s["rescale:encoder.final_layer_norm[2]"]
    assert params_of([final], "out") == {f"decoder.block.{i}.layer.1.EncDecAttention.{w}.weight"
                                         for i in range(LAYERS) for w in "kv"}
    hidden = "wi_1" if ffn == "gated-gelu" else "wi"
    assert set(s[f"rescale:{enc}1.DenseReluDense.{hidden}[3]"].members) == {
        Member(f"{enc}1.DenseReluDense.{hidden}.weight", 0, (3,), "in"),
        Member(f"{enc}1.DenseReluDense.wo.weight", 1, (3,), "out")}
    (joint,) = [g for g in s if "shared.weight" in g.params]
    assert params_of([joint], "out") == {"decoder.final_layer_norm.weight"}
    assert "relative_attention_bias" not in " ".join(params_of(s))
    certified(m, s, x, sample=12)
    assert_rejected(m, Symmetry("rescale", "wrong-cross-pair", (
        Member(f"{dec}1.EncDecAttention.q.weight", 0, (5,), "in"),
        Member(f"{dec}1.EncDecAttention.k.weight", 0, (6,), "out")), dec), x)
