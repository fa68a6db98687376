"""`einsum` contractions rewritten at capture time onto the ops the rule table (ops/) already follows: linear, matmul.

`torch.einsum` reaches the captured graph as one `aten.einsum` node, which has no rule (a barrier: every channel it
reads is tainted). Its common two-operand forms are a dense layer or a batched matrix product with the axes
permuted, so capture decomposes them (`DECOMPOSITIONS`, a make_fx decomposition table) into exactly that:

- dense layer: `x[..., j] W[k, j] -> y[..., k]`, with `x`'s other axes in any order and kept, no axis shared with
  `W` besides the contracted one: `permute(x) -> aten.linear(x', W) -> permute` (linear.py's reader/writer rule: W's
  row k writes output channel k, its column j reads input channel j); a weight stored `W[j, k]` (in, out) is
  `aten.matmul(x', W)` (the matmul rule: W's row j reads input channel j, its column k writes output channel k;
  certified in tests/test_einsum.py);
- batched product: `a[B, i, j] b[B, j, k] -> c[B, i, k]` with batch axes B present in both operands and the
  output, one free axis per operand, one contracted axis, any axis order: `permute -> aten.matmul -> permute`
  (attention.py's contraction rule: `q k^T` scores, `attn v` values).

The rewrite computes the same numbers (the einsum's own decomposition also lowers it to permute / bmm). Anything
else (one or three operands, ellipses, repeated or summed-out axes, several contracted axes) is lowered by
torch's own einsum decomposition (permute / reshape / bmm), whose pieces the rules follow soundly but without the
dense-layer structure; `aten.einsum` itself never reaches the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

aten = torch.ops.aten


def _permuted(t: Tensor, have: str, want: str) -> Tensor:
    """`t` (axes labelled `have`) with its axes in the order `want` (no node when already in order)."""
    return t if have == want else aten.permute.default(t, [have.index(c) for c in want])


def _parse(equation: str, n_operands: int) -> tuple[str, str, str] | None:
    """(a, b, out) axis letters of a two-operand, explicit-output einsum with distinct letters per term."""
    eq = equation.replace(" ", "")
    if n_operands != 2 or "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    return a, b, out


def einsum_as_matmul(equation: str, tensors: list[Tensor], path: Any = None) -> Tensor:
    """`aten.einsum(equation, tensors)` as permute / linear / matmul when it is a dense layer or a batched product
    (module docstring); otherwise torch's own einsum decomposition."""
    parsed = _parse(equation, len(tensors))
    if parsed is not None:
        a, b, out = parsed
        x, y = tensors
        contracted = (set(a) & set(b)) - set(out)
        batch = set(a) & set(b) & set(out)
        if len(contracted) == 1 and set(out) == (set(a) | set(b)) - contracted:
            (j,) = contracted
            if not batch and len(b) == 2:  # dense layer: y[..., k] = sum_j x[..., j] W[k, j]
                (k,) = set(b) - {j}
                kept = a.replace(j, "")
                xk = _permuted(x, a, kept + j)
                h = aten.linear.default(xk, y) if b == k + j else aten.matmul.default(xk, _permuted(y, b, j + k))
                return _permuted(h, kept + k, out)
            free_a, free_b = set(a) - set(b), set(b) - set(a)
            if batch and len(free_a) == 1 and len(free_b) == 1:  # batched product over the batch axes
                (i,), (k,) = free_a, free_b
                bt = "".join(c for c in out if c in batch)
                h = aten.matmul.default(_permuted(x, a, bt + i + j), _permuted(y, b, bt + j + k))
                return _permuted(h, bt + i + k, out)
    return aten.einsum.default.decompose(equation, tensors, path=path)


DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {aten.einsum.default: einsum_as_matmul}
"""The make_fx decomposition table capture traces with."""
