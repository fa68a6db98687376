"""A small LLaMA-style language model (the `llama-tiny` preset), written with stock torch modules.

The architecture of LLaMA (Touvron et al., 2023) at toy size, so that a language-model run takes minutes on a CPU:

    x_0 = E[tokens]                                             token embedding, no positional embedding
    for each block:  h = x + W_o attn(rope(W_q n1(x)), rope(W_k n1(x)), W_v n1(x))     causal, heads of size d/H
                     x = h + W_down (silu(W_gate n2(h)) * W_up n2(h))                  SwiGLU MLP
    logits = W_head n(x)                                        untied head, no biases anywhere

with n1, n2, n = nn.RMSNorm (learned weight), rotary position embeddings on queries and keys (the "rotate half"
form: coordinate c is rotated with c + d_h/2 by the angle t * 10000^(-2c/d_h) at position t) and multi-head
attention through `F.scaled_dot_product_attention(is_causal=True)` (every head has its own keys and values, as in
the first LLaMA; grouped-query attention is not used here).

Its symmetries (docs/theory.md section 1), all found by the detector from the captured graph and certified:
- translation: every input column of the head (softmax over the vocabulary: adding a constant to column j adds
  n(x)_j times it to every logit of a position);
- scale: the residual stream is read only by RMSNorms, so scaling every writer of the stream (the embedding, each
  W_o and each W_down) by one factor changes nothing: one group;
- rescale: each RMSNorm weight coordinate with the columns of the linear layers reading it (W_q, W_k, W_v, or
  W_gate, W_up, or the head); each value channel with the W_o column reading it; each W_up row with the W_down
  column reading it (silu(gate) * up is linear in up); each rotary pair of a head: the W_q rows {c, c + d_h/2}
  with the W_k rows {c, c + d_h/2} (the rotary embedding rotates coordinates c and c + d_h/2 together, so only the
  pair scales jointly: alpha on the queries, 1/alpha on the keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """x -> x * cos + rotate_half(x) * sin at each position t, with angles t * base^(-2c/d) (LLaMA's "rotate half"
    form; the cos/sin tables are buffers, not parameters)."""

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_positions: int = 2048, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        table = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", table.cos(), persistent=False)
        self.register_buffer("sin", table.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary queries and keys, no biases."""

    def __init__(self, dim: int, heads: int, max_positions: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, max_positions)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """W_down (silu(W_gate x) * W_up x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(n1(x)), then + mlp(n2(.))."""

    def __init__(self, dim: int, heads: int, hidden: int, max_positions: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads, max_positions)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """A LLaMA-style decoder (see the module docstring): token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int = 256, dim: int = 48, layers: int = 2, heads: int = 4, hidden: int = 128,
                 max_positions: int = 512, seq_len: int = 32):
        super().__init__()
        #: one example's shape (T,), read by `experiments.specs` to build example inputs
        self.input_shape = (seq_len,)
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, max_positions) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self._initialize()

    def _initialize(self) -> None:
        """Normal(0, 0.02) weights (GPT-2/LLaMA practice), RMSNorm weights 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_llama(num_classes: int = 256, **kwargs: int) -> TinyLlama:
    """`TinyLlama` with a vocabulary of `num_classes` tokens (the preset's factory: the classes of a language model
    are its vocabulary; 256 = one token per byte)."""
    return TinyLlama(vocab_size=num_classes, **kwargs)
