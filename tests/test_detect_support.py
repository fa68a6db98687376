"""Brute-force certification for detection tests (no tests here).

Every detected group is checked by applying its action with the reference `Symmetry.act` to a
float64 copy of the model (normalisation eps set to a negligible value) and recomputing the loss
and the outputs with `torch.func.functional_call` under a fixed RNG seed (same dropout masks).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from neural_mechanics.symmetry.groups import Symmetry, SymmetrySet

TOL = 1e-9


def counts(s: SymmetrySet) -> tuple[int, int, int]:
    """(translation, scale, rescale) group counts, the order the detection tests state them in."""
    c = s.counts()
    return c["translation"], c["scale"], c["rescale"]


def float64_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).double()
    for mod in m.modules():
        if hasattr(mod, "eps") and isinstance(mod.eps, float):
            setattr(mod, "eps", 1e-30)  # noqa: B010 (mypy: eps is not a declared attribute of Module)
    return m


def _outputs(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: tuple) -> Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        out = functional_call(model, (params, {k: v.clone() for k, v in buffers.items()}), inputs)
    return out if isinstance(out, Tensor) else out[0]


def certify_groups(
    model: nn.Module,
    groups: Iterable[Symmetry],
    inputs: Tensor | tuple,
    *,
    loss: str = "cross_entropy",
    sample: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Worst relative change (loss, and outputs for scale/rescale) per group name; asserts none exceeds TOL."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    m = float64_copy(model)
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    groups = list(groups)
    if sample is not None and len(groups) > sample:
        groups = random.Random(seed).sample(groups, sample)
    out0 = _outputs(m, params, buffers, inputs)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(out: Tensor) -> Tensor:
        if loss == "cross_entropy":
            target = torch.randint(0, out.shape[1], (out.shape[0],), generator=torch.Generator().manual_seed(7))
            return F.cross_entropy(out, target)
        return (out**2).mean()

    l0 = loss_of(out0)
    worst: dict[str, float] = {}
    for g in groups:
        alpha = 0.83 if g.kind == "translation" else float(torch.empty(()).uniform_(0.4, 2.5, generator=gen))
        new = dict(params)
        new.update(g.act(params, alpha))
        moved = sum(float((new[k] - params[k]).abs().max()) for k in g.params)
        assert moved > 0, f"group {g.name} does not move any parameter"
        out = _outputs(m, new, buffers, inputs)
        rel = float((loss_of(out) - l0).abs() / l0.abs().clamp_min(1e-30))
        if g.kind != "translation":
            rel = max(rel, float((out - out0).abs().max() / out0.abs().max().clamp_min(1e-30)))
        worst[g.name] = rel
        assert rel <= TOL, f"group {g.name} ({g.kind}) changes the loss/outputs by {rel:.3g}\n{g.details()}"
    return worst


def certify_all_at_once(model: nn.Module, groups: Iterable[Symmetry], inputs: Tensor, kind: str) -> float:
    """Compose every group of one kind (each with its own alpha): the composition is a symmetry too."""
    m = float64_copy(model)
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    x = (inputs.double(),)
    out0 = _outputs(m, params, buffers, x)
    new = {k: v.clone() for k, v in params.items()}
    gen = torch.Generator().manual_seed(3)
    for g in groups:
        if g.kind != kind:
            continue
        alpha = float(torch.empty(()).uniform_(0.5, 2.0, generator=gen))
        for mem in g.members:  # the action of Symmetry.act, applied slice by slice (fast for thousands of groups)
            p = new[mem.param]
            view = p if mem.dim is None else p.index_select(mem.dim, torch.tensor(mem.index))
            factor = alpha if mem.sign > 0 else 1 / alpha
            view = view + alpha if kind == "translation" else view * factor
            if mem.dim is None:
                new[mem.param] = view
            else:
                p.index_copy_(mem.dim, torch.tensor(mem.index), view)
    out = _outputs(m, new, buffers, x)
    if kind == "translation":
        out, out0 = out.log_softmax(1), out0.log_softmax(1)
    rel = float((out - out0).abs().max() / out0.abs().max())
    assert rel <= 1e-8, f"composition of all {kind} groups changes the outputs by {rel:.3g}"
    return rel
