"""Gradient, reusable Hessian-vector products, and signed probes of many groups' Hessian constraints at once.

`Hessian` holds g and a vjp closure for H v at one theta (torch.func: vjp of grad, reverse over reverse;
H is symmetric, so the vjp of the gradient map with cotangent v is H v; the closure is built once and
reused). `HessianProbe` tests a whole block of groups with one HVP: the residual r_i = H xi_i + J_i^T g is
linear in the groups, so for signs s_i = +-1 and v = sum_i s_i xi_i

    R(s) = H v + sum_i s_i J_i^T g = sum_i s_i r_i

(docs/theory.md section 1 for xi and J per kind; `check_constraints` turns R(s) into per-group bounds).
Parameter dicts are the vectors: name -> tensor, missing entries meaning zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.utils import parameter_dict

PDict = dict[str, Tensor]
Loss = Callable[[Any], Tensor]
"""outputs -> scalar loss, the targets already bound (`LossSpec.bind`, symmetry/loss.py)."""


def norm(v: Mapping[str, Tensor]) -> float:
    """Euclidean norm of a parameter dict, accumulated in float64."""
    total = sum((t.to(torch.float64).pow(2).sum() for t in v.values()), torch.zeros((), dtype=torch.float64))
    return float(torch.as_tensor(total).sqrt())


def axpy(a: Mapping[str, Tensor], b: Mapping[str, Tensor], like: Mapping[str, Tensor], alpha: float = 1.0) -> PDict:
    """a + alpha * b over the parameters of `like` (missing entries are zero)."""
    out: PDict = {}
    for k, t in like.items():
        x = a.get(k)
        y = b.get(k)
        if x is None and y is None:
            out[k] = torch.zeros_like(t)
        elif y is None:
            out[k] = x  # type: ignore[assignment]
        elif x is None:
            out[k] = alpha * y
        else:
            out[k] = x + alpha * y
    return out


def mul(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> PDict:
    """Elementwise a * b over the keys of b."""
    return {k: a[k] * v for k, v in b.items()}


class Hessian:
    """Gradient and reusable Hessian-vector products of loss(model(*args)) at the model's parameters.

    HVPs are torch.func.vjp of torch.func.grad (reverse over reverse): H is symmetric, so the vjp
    of the gradient map with cotangent v is H v. The vjp closure is built once (need_hvp=True); without
    it the gradient comes from one autograd pass. `count` is the number of HVPs taken.
    """

    def __init__(self, model: nn.Module, loss: Loss, args: tuple[Any, ...], need_hvp: bool):
        self.params = parameter_dict(model)
        buffers = {n: b for n, b in model.named_buffers()}

        def loss_of(p: Mapping[str, Tensor]) -> Tensor:
            return loss(functional_call(model, {**p, **buffers}, args))

        def loss_and_value(p: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
            value = loss_of(p)
            return value, value.detach()

        self.count = 0
        if need_hvp:  # one forward pass: gradient, loss value and the reusable HVP closure
            self.grad, self._vjp, value = vjp(  # type: ignore[misc]
                grad(loss_and_value, has_aux=True), self.params, has_aux=True
            )
        else:
            p = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
            value = loss_of(p)
            gs = torch.autograd.grad(value, list(p.values()), allow_unused=True)
            self.grad = {k: torch.zeros_like(v) if gk is None else gk for (k, v), gk in zip(p.items(), gs, strict=True)}
        self.grad = {k: t.detach() for k, t in self.grad.items()}
        self.loss = float(value.detach())

    def hvp(self, v: Mapping[str, Tensor]) -> PDict:
        """H v (entries of v missing from the dict are zero)."""
        self.count += 1
        full = {k: v[k] if k in v else torch.zeros_like(t) for k, t in self.params.items()}
        return {k: t.detach() for k, t in self._vjp(full)[0].items()}


class HessianProbe:
    """Signed combinations of the Hessian constraints of many groups, one HVP pair per call.

    For signs s (n,), zero outside the probed block:
        v = sum_i s_i xi_i,  jg = sum_i s_i J_i^T g,  w = sum_i s_i u_i,
        residual(s) = H v + jg = sum_i s_i r_i          (linearity; the basis of the probe design)
    with xi_i = D_i theta, J_i^T g = D_i g (quadratic kinds), xi_i = D_i, J_i = 0 (translation), and
    u_i = u_coef_i |D_i| z (a shared Gaussian field z scaled so that |u_i| = |xi_i|).
    """

    def __init__(self, hes: Hessian, inc: GroupIncidence, z: Mapping[str, Tensor], u_coef: Tensor):
        self.hes, self.inc, self.z, self.u_coef = hes, inc, z, u_coef
        self.quad_f = inc.quadratic.to(torch.float64)

    def directions(self, s: Tensor) -> tuple[PDict, PDict, PDict]:
        """v = sum_i s_i xi_i, jg = sum_i s_i J_i^T g and w = sum_i s_i u_i for the signs s."""
        s = s.to(device=self.inc.device, dtype=torch.float64)
        theta, g = self.hes.params, self.hes.grad
        sq = s * self.quad_f
        dq = self.inc.expand(sq)
        v = axpy(mul(theta, dq), self.inc.expand(s - sq), theta)
        jg = axpy({}, mul(g, dq), theta)
        w = axpy({}, mul(self.z, self.inc.expand(s * self.u_coef, signed=False)), theta)
        return v, jg, w

    def residual(self, s: Tensor) -> PDict:
        """H v + sum_i s_i J_i^T g for the signs s (one HVP)."""
        v, jg, _ = self.directions(s)
        return axpy(self.hes.hvp(v), jg, self.hes.params)

    def stats(self, s: Tensor) -> dict[str, float]:
        """Norms |R|, |H v|, |jg|, |H w|, |H w + jg| for the signs s (two HVPs)."""
        v, jg, w = self.directions(s)
        hv = self.hes.hvp(v)
        hw = self.hes.hvp(w)
        theta = self.hes.params
        return {
            "r": norm(axpy(hv, jg, theta)),
            "Hxi": norm(hv),
            "Jg": norm(jg),
            "Hu": norm(hw),
            "ru": norm(axpy(hw, jg, theta)),
        }
