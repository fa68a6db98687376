"""A synthetic scale-invariant objective with noise gradients: the regime the equilibrium theory is about.

    L_k(theta) = sum_groups <theta_A / |theta_A|, xi_{k,A}>,     xi_k ~ N(0, I) fresh every step (seeded)

Its gradient g_A = (xi - <theta_hat, xi> theta_hat) / |theta_A| is orthogonal to theta_A, scales as 1 / |theta_A|
(exact scale invariance of every group) and has no signal at all (zero mean, uncorrelated across steps). Groups
are the rows of each matrix ("rows") or whole matrices ("matrix"). Used by tests (short runs) and by
benchmarks/equilibrium_laws.py (long runs). (No tests here: the module name keeps it next to the tests.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet


class NoiseSphere(nn.Module):
    """Matrices W_i (bias-free) whose rows (or whole matrices) are scale groups of the noise objective."""

    def __init__(self, shapes: Sequence[tuple[int, int]], groups: str = "rows", seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(s, generator=gen) / s[1] ** 0.5) for s in shapes])
        self.groups = groups
        self.noise = torch.Generator().manual_seed(seed + 1)

    def loss(self) -> torch.Tensor:
        total = torch.zeros((), dtype=self.weights[0].dtype)
        for w in self.weights:
            xi = torch.randn(w.shape, generator=self.noise).to(w.dtype)
            if self.groups == "rows":
                total = total + (w / w.norm(dim=1, keepdim=True) * xi).sum()
            else:
                total = total + (w / w.norm() * xi).sum()
        return total

    def symmetries(self) -> SymmetrySet:
        syms = []
        for i, w in enumerate(self.weights):
            name = f"weights.{i}"
            if self.groups == "rows":
                syms += [Symmetry("scale", f"{name}.row{r}", (Member(name, 0, (r,)),), layer=name)
                         for r in range(w.shape[0])]
            else:
                syms.append(Symmetry("scale", f"{name}.all", (Member(name),), layer=name))
        return SymmetrySet(syms)


def run_noise(model: NoiseSphere, opt: torch.optim.Optimizer, steps: int,
              on_step: Callable[[int], None] | None = None) -> None:
    for k in range(steps):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
        if on_step is not None:
            on_step(k)
