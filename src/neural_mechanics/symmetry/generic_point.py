"""Generic points: the parameter values at which `certify` tests a symmetry claim.

A symmetry must hold at every parameter value theta. Tested only at the model's own parameters, special values
vouch for wrong groups: a zero-initialised residual branch (torchvision/timm `zero_init_residual`, a zero head)
multiplies whatever a wrong action does inside it by zero, and a layer scale of 1e-6 shrinks it below any
absolute tolerance. Certification therefore runs at a generic point, the model's parameters plus a seeded random
perturbation of EVERY parameter tensor p (trainable or frozen, zero-initialised ones included; buffers such as
running statistics and attention masks are left as they are):

    theta'_p = theta_p + eps * max(rms(theta_p), phi * rho) * z_p,        z_p ~ N(0, I) (seeded, float64)

with eps = `PERTURBATION` (0.5: each entry moves by about half the tensor's typical size, so no entry keeps a
special value), phi = `FLOOR_FRACTION` (0.1) and rho = the median rms over the model's parameter tensors that
are not all zero (1 when every tensor is zero). The floor phi * rho gives an all-zero or tiny tensor (a zero
branch, a 1e-6 layer scale) a perturbation on the scale of the model's own weights, so that the branch becomes
visible, while every tensor keeps its own scale otherwise: the model stays in its usual regime (a BatchNorm
weight of 1 moves by ~0.5, a conv weight of rms 0.05 by ~0.025). A symmetry holds at theta' as at theta, so
nothing true is lost; a wrong group no longer hides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["FLOOR_FRACTION", "PERTURBATION", "GenericPoint", "generic_point"]

PERTURBATION = 0.5
"""eps: the perturbation's size relative to each tensor's rms."""
FLOOR_FRACTION = 0.1
"""phi: the floor of the scale, as a fraction of the median tensor rms of the model."""


@dataclass
class GenericPoint:
    """The perturbed parameters and how they were made."""

    params: dict[str, Tensor]
    perturbation: float
    reference_rms: float
    """rho: the median rms of the model's non-zero parameter tensors."""
    floored: list[str] = field(default_factory=list)
    """Tensors whose own rms was below the floor (all-zero or tiny: a zero branch, a small layer scale)."""
    seed: int = 0

    def describe(self) -> str:
        if self.perturbation == 0:
            return "the model's own parameters (no perturbation)"
        text = (f"generic point: every parameter tensor + {self.perturbation:g} x max(rms, "
                f"{FLOOR_FRACTION:g} x {self.reference_rms:.3g}) x N(0, 1), seed {self.seed}")
        if self.floored:
            more = len(self.floored) - 4
            shown = ", ".join(self.floored[:4]) + (f" and {more} more" if more > 0 else "")
            text += f"; {len(self.floored)} all-zero or tiny tensor(s) perturbed at the floor ({shown})"
        return text


def _rms(t: Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def generic_point(params: Mapping[str, Tensor], *, perturbation: float = PERTURBATION, seed: int = 0) -> GenericPoint:
    """theta + eps * max(rms(theta_p), phi * rho) * z_p for every floating tensor p (the module docstring's rule).

    The draws come from a CPU generator seeded with `seed`, in the order of `params` (named_parameters order), so
    a point is reproducible on any device; perturbation=0 returns the parameters unchanged.
    """
    if perturbation < 0 or not math.isfinite(perturbation):
        raise ValueError(f"perturbation must be a finite number >= 0, got {perturbation}")
    rms = {k: _rms(v) for k, v in params.items() if v.is_floating_point()}
    nonzero = sorted(r for r in rms.values() if r > 0)
    ref = nonzero[len(nonzero) // 2] if nonzero else 1.0
    if perturbation == 0:
        return GenericPoint(dict(params), 0.0, ref, [], seed)
    floor = FLOOR_FRACTION * ref
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    floored: list[str] = []
    for k, v in params.items():
        if k not in rms:
            out[k] = v
            continue
        if rms[k] < floor:
            floored.append(k)
        scale = perturbation * max(rms[k], floor)
        z = torch.randn(v.shape, generator=gen, dtype=torch.float64)
        out[k] = (v.detach().double() + scale * z.to(v.device)).to(v.dtype)
    return GenericPoint(out, perturbation, ref, floored, seed)
