"""The symmetry groups of one charge type, compiled once: quadratic (scale, rescale) and linear (translation).

A family holds what never changes during a run: the groups' names, kinds and layers, their incidence table over
the parameters' cells (`symmetry/incidence.py`), kind masks, and the per-group validity flag the tracker clears
when a group leaves the theory. Everything in which the two charge types differ is said once, here, as data:

    quadratic  C = <theta, D theta>   linear functional v = D theta   norm = |C| (scale) | |theta_A1|^2 + |theta_A2|^2
    linear     T = <1_A, theta>       linear functional v = 1_A       norm = sum_A |theta|

`pairing(name, field)` is the family's linear functional applied to a field (<D theta, x> or <1_A, x>): the
breaking term B = <v, g>, the buffer overlap <v, b>, an optimizer's <v, u>, all with one declaration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.tracking.products import Product

__all__ = ["ChargeFamily", "LinearFamily", "QuadraticFamily", "compile_families"]


class ChargeFamily:
    """The groups of one charge type, compiled against the parameters' shapes on one device."""

    quadratic: ClassVar[bool]
    functional: ClassVar[str | None]
    """Field the charge's linear functional multiplies ("theta": v = D theta; None: v = 1_A)."""
    charge: ClassVar[Product]
    """The charge C_k itself (signed)."""
    norm_sq: ClassVar[Product]
    """The size behind `norm` (see `norm`)."""
    grad_sq: ClassVar[Product]
    """|g_A|^2 (unsigned), logged as grad_norm = sqrt of it."""

    def __init__(self, syms: Sequence[Symmetry], shapes: Mapping[str, torch.Size], device: torch.device):
        self.syms = list(syms)
        self.names = [s.name for s in self.syms]
        self.kinds = np.array([s.kind for s in self.syms], dtype=object)
        self.layers = np.array([s.layer for s in self.syms], dtype=object)
        self.n = len(self.syms)
        self.device = device
        self.table = GroupIncidence(self.syms, shapes, device, error=TrackerError)
        self.is_scale = torch.tensor([s.kind == "scale" for s in self.syms], dtype=torch.bool, device=device)
        self.is_rescale = torch.tensor([s.kind == "rescale" for s in self.syms], dtype=torch.bool, device=device)
        self.valid = torch.ones(self.n, dtype=torch.bool, device=device)
        """Cleared per group when it leaves the theory (see `tracking/param_groups.py`); never set again."""

    @classmethod
    def pairing(cls, name: str, field: str, at: str = "theta", signed: bool = True) -> Product:
        """<v, field> with the family's functional v taken at `at` (D * at for quadratic charges, 1_A for linear)."""
        return Product(name, at, field, signed) if cls.functional is not None else Product(name, field, None, signed)

    def norm(self, charge: Tensor, norm_sq: Tensor) -> Tensor:
        """The group's size, the denominator of relative errors (`tracking/metrics.py`), from charge and norm_sq."""
        raise NotImplementedError

    def nan(self) -> Tensor:
        """float64 [n] of NaN on the family's device."""
        return torch.full((self.n,), float("nan"), dtype=torch.float64, device=self.device)


class QuadraticFamily(ChargeFamily):
    """Scale and rescale groups: C = <theta, D theta>, D = +1 on A (A1), -1 on A2."""

    quadratic = True
    functional = "theta"
    charge = Product("C", "theta", "theta")
    norm_sq = Product("norm2", "theta", "theta", signed=False)
    grad_sq = Product("gnorm2", "grad", "grad", signed=False)

    def norm(self, charge: Tensor, norm_sq: Tensor) -> Tensor:
        """|C| for scale groups, |theta_A1|^2 + |theta_A2|^2 for rescale groups."""
        return torch.where(self.is_rescale, norm_sq, charge.abs())


class LinearFamily(ChargeFamily):
    """Translation groups: T = <1_A, theta>."""

    quadratic = False
    functional = None
    charge = Product("C", "theta")
    norm_sq = Product("norm2", "abs_theta")
    grad_sq = Product("gnorm2", "grad", "grad")

    def norm(self, charge: Tensor, norm_sq: Tensor) -> Tensor:
        """sum_A |theta|."""
        return norm_sq


def compile_families(symmetries: Iterable[Symmetry], shapes: Mapping[str, torch.Size],
                     device: torch.device) -> list[ChargeFamily]:
    """The non-empty families of a symmetry set, quadratic first (the order of rows and of the tracker state)."""
    syms = list(symmetries)
    out: list[ChargeFamily] = []
    for cls in (QuadraticFamily, LinearFamily):
        part = [s for s in syms if KINDS[s.kind].quadratic == cls.quadratic]
        if part:
            out.append(cls(part, shapes, device))
    return out
