"""Detection on the `meta` device: the Llama-3-8B layer structure at reduced width, found without any weight values.

A meta tensor has a shape and a dtype but no storage: reading a value (`bool(t)`, `float(t)`, `.item()`, `.tolist()`,
a comparison fed to `if`) raises. A model built under `torch.device("meta")` and fed meta token ids therefore
proves that every step of `find_symmetries` (fake-mode capture, op rules, channel and translation groups, ties)
reads only shapes. The full-size run (8e9 parameters, timed against <= 60 s and <= 4 GB) is
benchmarks/detection_meta.py; here the same architecture at reduced width is certified.

Reduced copy of Llama-3-8B (same structure: 32 layers, 32 query heads over 8 key/value heads (GQA, 4 query heads
per key head), SwiGLU with intermediate / hidden = 3.5, untied head, rotary embeddings): hidden E = 64, head dim
2 (so one rotary pair per head: coordinates 0 and 1), intermediate I = 224, vocabulary 64.
Derived by hand (tests/test_hf_llama.py), per layer: 2E norm -> linear rescales, I SwiGLU up/down rescales,
KV * 2 value rows (each read by the 4 query heads its head serves), KV * 1 rotary query/key pairs:
2 * 64 + 224 + 16 + 8 = 376; plus E = 64 rescales of the final norm with lm_head's columns, E translations of
lm_head's columns, 1 scale group of the residual stream: (64, 1, 32 * 376 + 64) = (64, 1, 12096).
"""

from __future__ import annotations

import pytest
import torch

from hf_support import SPECIAL, TOKENS, certified, tokens
from neural_mechanics.symmetry.detect import find_symmetries
from test_detect_support import counts

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

LAYERS, E, HEADS, KV, I, VOCAB = 32, 64, 32, 8, 224, 64


def config(layers: int = LAYERS):
    return transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=E, num_attention_heads=HEADS,
                                    num_key_value_heads=KV, intermediate_size=I, vocab_size=VOCAB,
                                    max_position_embeddings=16, tie_word_embeddings=False, use_cache=False, **SPECIAL)


def expected(layers: int = LAYERS) -> tuple[int, int, int]:
    d_head = E // HEADS
    per_layer = 2 * E + I + KV * d_head + KV * d_head // 2
    assert per_layer == 376
    return E, 1, layers * per_layer + E


@pytest.mark.slow
def test_meta_device_detection_matches_the_real_model_and_certifies():
    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(config()).train()
    x = tokens(2, 8, VOCAB)
    assert all(p.is_meta for p in meta_model.parameters())
    found = find_symmetries(meta_model, x.to("meta"), loss=TOKENS)
    assert counts(found) == expected() == (64, 1, 12096)
    # the same architecture with real (random) weights: the same groups, and they certify at a generic point
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(config()).train()
    assert sorted(g.name for g in find_symmetries(real, x, loss=TOKENS)) == sorted(g.name for g in found)
    certified(real, found, x, sample=8)


def test_meta_device_detection_never_reads_values():
    # two layers suffice to run every rule once; a value read on a meta tensor would raise here
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(config(layers=2)).train()
    found = find_symmetries(m, torch.zeros(2, 8, dtype=torch.long, device="meta"), loss=TOKENS)
    assert counts(found) == expected(layers=2)
    assert set(found.meta["blocked_ops"]) <= {"aten.silu", "aten.log_softmax"}
