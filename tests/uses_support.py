"""Shared helpers for the tests of neural_mechanics.uses (no tests here).

- `outputs64`: the brute-force reference for "the function is unchanged": a float64 copy of the model with
  normalisation eps ~0 (test_detect_support.float64_copy), run on the batch under a fixed RNG seed; returns
  the log-softmax outputs and the cross-entropy loss against fixed labels. Independent of the library's own
  `function_change`.
- `quantile_biases` / `generic`: put every bias that feeds a ReLU / LeakyReLU at a random quantile of its unit's
  pre-activation over the batch, so that every unit is active on part of the samples: the generic point the
  completeness counts need (no unit dead or always active, no two units with nearly the same active set); and
  check that.
- `Llama`: a small LLaMA-style decoder (RMSNorm pre-norm, SwiGLU MLP, causal attention, untied head) that
  returns logits as (N, vocab, T) for cross-entropy over dim 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from test_detect_support import float64_copy


def outputs64(model: nn.Module, x: Tensor | tuple, params: dict[str, Tensor] | None = None,
              labels_seed: int = 7) -> tuple[Tensor, Tensor]:
    """(log-softmax outputs over dim 1, cross-entropy loss) of a float64 copy (optionally with other params)."""
    inputs = x if isinstance(x, tuple) else (x,)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    m = float64_copy(model)
    if params is not None:
        state = {k: v.detach().double() for k, v in params.items()}
    else:
        state = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in m.named_buffers()}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        out = functional_call(m, (state, buffers), inputs)
    logp = torch.log_softmax(out, dim=1)
    shape = (out.shape[0], *out.shape[2:])
    labels = torch.randint(0, out.shape[1], shape, generator=torch.Generator().manual_seed(labels_seed))
    return logp, F.nll_loss(logp, labels)


def same_function(a: nn.Module, b: nn.Module, x: Tensor | tuple, tol: float = 1e-12) -> float:
    """Assert that a and b compute the same log-softmax outputs and loss (relative, float64); return the change."""
    oa, la = outputs64(a, x)
    ob, lb = outputs64(b, x)
    rel_out = float((ob - oa).abs().max() / oa.abs().max())
    rel_loss = float((lb - la).abs() / la.abs())
    assert rel_out <= tol and rel_loss <= tol, (rel_out, rel_loss)
    return max(rel_out, rel_loss)


def quantile_biases(model: nn.Module, x: Tensor, seed: int = 0) -> nn.Module:
    """In place: each Linear / Conv / BatchNorm bias directly before a ReLU or LeakyReLU is shifted so that the
    activation's input for each unit sits at a random quantile (uniform in [0.3, 0.7], one per unit) over samples
    and positions.

    Every unit is then active on 30-70% of the batch (neither dead nor always active: either adds free
    directions), and units of one layer do not share their active set (two units with the same active set act
    as one linear map on the batch, so mixing them is free; a median for all would do that to units of a 1-d
    input, and BatchNorm's zero-mean outputs to strongly correlated units). Works on nn.Sequential models whose
    activations directly follow the layer that owns the bias.
    """
    gen = torch.Generator().manual_seed(seed)
    mods = list(model.children())
    with torch.no_grad():
        h = x
        for i, mod in enumerate(mods):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            layer = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)
            if isinstance(mod, layer) and mod.bias is not None and isinstance(nxt, (nn.ReLU, nn.LeakyReLU)):
                pre = mod(h)
                flat = pre.transpose(0, 1).reshape(pre.shape[1], -1)
                q = torch.empty(flat.shape[0], dtype=flat.dtype).uniform_(0.3, 0.7, generator=gen)
                mod.bias -= torch.stack([torch.quantile(row, float(qi)) for row, qi in zip(flat, q, strict=True)])
            h = mod(h)
    return model


def patterns(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Per ReLU / LeakyReLU module, the bool [units, samples x positions] table of where each unit's input is > 0."""
    tables: list[Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        h = args[0]
        tables.append((h > 0).transpose(0, 1).reshape(h.shape[1], -1))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return tables


def generic(model: nn.Module, x: Tensor, margin: float = 0.1) -> bool:
    """The generic-point precondition of the completeness counts, for homogeneous activations: every unit is active
    on at least `margin` and at most 1 - `margin` of the batch, and any two units of a layer disagree on at least
    `margin` of it (nearly equal active sets make mixing the two units nearly free)."""
    for table in patterns(model, x):
        frac = table.double().mean(1)
        if not bool(((frac >= margin) & (frac <= 1 - margin)).all()):
            return False
        diff = (table[:, None, :] != table[None, :, :]).double().mean(2)
        diff.fill_diagonal_(1.0)
        if float(diff.min()) < margin:
            return False
    return True


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, ff, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """Embedding -> L pre-RMSNorm blocks (attention + SwiGLU) -> final RMSNorm -> untied head."""

    def __init__(self, vocab: int = 17, d: int = 16, heads: int = 2, ff: int = 24, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).transpose(1, 2)


def small_mlp() -> nn.Module:
    """A 4-8-8-3 BatchNorm ReLU MLP (bias-free before BN) for CLI tests (`uses_support:small_mlp`)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
