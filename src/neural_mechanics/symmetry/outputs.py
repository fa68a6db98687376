"""Where the tensors of a model output are, and which of them a loss reads.

A model may return a tensor, a tuple or list (logits and auxiliary heads), a dict, or a structured object
(Hugging Face's `ModelOutput`, a dict subclass registered as a pytree node, holding `logits` next to hidden
states or an encoder state). The loss reads only part of that; certification compares only what the loss
reads (symmetry/certify.py), so an extra output a real group changes (a hidden state, an encoder state) does
not fail the group, while everything the loss depends on is compared.

* `locate_logits(out)`: the logits of an output and where they were found (a softmax loss reads them);
* `output_leaves(out)`: every tensor of an output with its path, in pytree order;
* `read_leaves(out, loss)`: the output tensors a loss function depends on, found by autograd: each floating
  tensor of the output is replaced by a leaf that requires grad, the loss is evaluated once, and the tensors
  with a gradient path to it are the ones it reads (a structural fact: a tensor the loss never touches gets no
  gradient whatever the values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten

from neural_mechanics.errors import LossSpecError

__all__ = ["first_tensor", "leaves_at", "locate_logits", "output_leaves", "output_tensors", "read_leaves"]

Leaf = tuple[str, Tensor]
"""(path of the tensor in the output, e.g. "output['logits']" or "output[0]", the tensor)."""


def locate_logits(out: Any) -> Leaf:
    """The logits of a model output and where they are: the tensor itself, a dict's (or Hugging Face output's)
    "logits", an object's `.logits`, or the first tensor of a tuple/list (of a dict's values, in order)."""
    if isinstance(out, Tensor):
        return "output", out
    if isinstance(out, dict):
        if "logits" in out and isinstance(out["logits"], Tensor):
            return "output['logits']", out["logits"]
        for key, value in out.items():
            if isinstance(value, Tensor):
                return f"output[{key!r}]", value
    elif isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            if isinstance(value, Tensor):
                return f"output[{i}]", value
    if isinstance(getattr(out, "logits", None), Tensor):
        return "output.logits", out.logits
    raise LossSpecError(
        f"the model returned {type(out).__name__}, in which no logits tensor was found",
        "return a tensor (or a tuple whose first tensor is the logits), or pass loss=callable(outputs)",
    )


def first_tensor(out: Any) -> Tensor:
    """The logits of a model output (`locate_logits` without the path)."""
    return locate_logits(out)[1]


def output_leaves(out: Any) -> list[Leaf]:
    """Every tensor in a model output (nested tuples, lists, dicts, registered output objects) with its path."""
    flat, _ = tree_flatten_with_path(out)
    return [(f"output{keystr(path)}", t) for path, t in flat if isinstance(t, Tensor)]


def output_tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model output, in pytree order."""
    return [t for _, t in output_leaves(out)]


def leaves_at(out: Any, paths: Sequence[str]) -> list[Tensor]:
    """The tensors of `out` at `paths` (as `output_leaves` writes them); a missing path is a LossSpecError."""
    by_path = dict(output_leaves(out))
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise LossSpecError(f"the model output has no tensor at {missing[0]} on this evaluation",
                            "return outputs of the same structure on every call")
    return [by_path[p] for p in paths]


def read_leaves(out: Any, loss: Callable[[Any], Tensor]) -> list[Leaf]:
    """The floating output tensors `loss(out)` depends on (autograd reachability), with their paths.

    When the loss has no gradient path to any output (a loss through argmax, say) the dependence cannot be
    seen this way, and every floating output tensor is returned.
    """
    flat, spec = tree_flatten_with_path(out)
    probes: list[Any] = []
    watched: list[int] = []
    for i, (_, leaf) in enumerate(flat):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            probes.append(leaf.detach().requires_grad_(True))
            watched.append(i)
        else:
            probes.append(leaf)
    if not watched:
        return []
    every = [(f"output{keystr(flat[i][0])}", flat[i][1]) for i in watched]
    with torch.enable_grad():
        value = loss(tree_unflatten(probes, spec))
        if not isinstance(value, Tensor) or not value.requires_grad:
            return every
        grads = torch.autograd.grad(value.sum(), [probes[i] for i in watched], allow_unused=True)
    return [leaf for leaf, g in zip(every, grads, strict=True) if g is not None]
