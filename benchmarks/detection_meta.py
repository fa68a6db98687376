"""Symmetry detection on a full-size LLM built on the `meta` device: no weight is allocated, only shapes are read.

    PYTHONPATH=src .venv/bin/python benchmarks/detection_meta.py [--layers 32] [--seq 16] [--batch 2] [--threads 1]

The model is `transformers.LlamaForCausalLM` from a Llama-3-8B-sized `LlamaConfig` (32 layers, hidden 4096, 32
query heads, 8 key/value heads (GQA), intermediate 14336, vocabulary 128256, untied head: about 8.0e9 parameters,
32 GB in float32) built under `torch.device("meta")`, fed a (batch, seq) batch of token ids on the meta device,
with token-level cross-entropy (softmax over the vocabulary axis). Capture runs in fake mode (shapes only), and no
later step reads a parameter's values, so the model never exists in memory. Reported: wall-clock seconds of
`find_symmetries` (one call, after building the model; its CPU time too: on a shared machine the wall-clock time
is inflated by other load) and the process's peak resident set size (ru_maxrss), each
against the goal (<= 60 s, <= 4 GB), and the counts against the hand-derived ones (tests/test_hf_llama.py: per
layer 2E + I + 6 KV rescale groups, plus E rescale groups at the head, E translations of the head's columns and
one scale group of the residual stream; the same formula is certified on a reduced-width copy in
tests/test_hf_meta.py). `--layers` builds a shallower copy (the per-layer work is the same in every layer).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.loss import LossSpec

GOAL_SECONDS, GOAL_RSS_GB = 60.0, 4.0
LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 30) if sys.platform == "darwin" else rss / (1 << 20)


def expected_counts(layers: int, hidden: int, heads: int, kv: int, inter: int) -> dict[str, int]:
    """Hand-derived counts of an untied LLaMA (tests/test_hf_llama.py): per layer 2E norm -> linear rescales, I
    SwiGLU up/down rescales, KV * d_head value rows and KV * d_head / 2 rotary query/key pairs; E head rescales, E
    head translations, one residual-stream scale group."""
    d_head = hidden // heads
    per_layer = 2 * hidden + inter + kv * d_head + kv * d_head // 2
    return {"translation": hidden, "scale": 1, "rescale": layers * per_layer + hidden}


def main() -> None:
    import transformers  # optional dependency (the `hf` extra)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = transformers.LlamaConfig(num_hidden_layers=args.layers, use_cache=False, **LLAMA3_8B)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).train()
    built = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    rss_before = peak_rss_gb()
    t0, c0 = time.perf_counter(), time.process_time()
    found = find_symmetries(model, x, loss=LossSpec.cross_entropy(class_dim=-1))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = peak_rss_gb()
    want = expected_counts(args.layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.intermediate_size)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)")
    print(f"LlamaForCausalLM on meta: {args.layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
          f"heads / {cfg.num_key_value_heads} KV, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}: "
          f"{n_params / 1e9:.2f}e9 parameters (built in {built:.1f} s), input {args.batch}x{args.seq} token ids")
    print(f"graph nodes {found.meta['graph_nodes']}, blocked ops {found.meta['blocked_ops']}")
    print(f"counts {found.counts()}  (derived by hand: {want}) -> {'OK' if found.counts() == want else 'MISMATCH'}")
    busy = "" if seconds < 1.5 * cpu else " (wall >> CPU: a busy machine)"
    print(f"find_symmetries: {seconds:.1f} s wall, {cpu:.1f} s CPU (goal <= {GOAL_SECONDS:.0f} s) -> "
          f"{'OK' if seconds <= GOAL_SECONDS else 'OVER'}{busy}")
    print(f"peak RSS: {rss:.2f} GB (before detection {rss_before:.2f} GB; goal <= {GOAL_RSS_GB:.0f} GB) -> "
          f"{'OK' if rss <= GOAL_RSS_GB else 'OVER'}")


if __name__ == "__main__":
    main()
