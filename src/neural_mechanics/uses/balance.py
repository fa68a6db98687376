"""`balance`: move every rescale group to the minimum-norm point of its orbit (and scale groups to a chosen norm).

A rescale group multiplies A1 by alpha and A2 by 1/alpha. With N1 = |theta_A1|^2 and N2 = |theta_A2|^2,
the squared norm along the orbit is alpha^2 N1 + N2 / alpha^2, smallest at alpha^4 = N2 / N1, where
|alpha theta_A1| = |theta_A2 / alpha|: the group is *balanced*, its charge R = N1 - N2 is 0.

Overlapping groups (the rows of layer l are A1 of one group each, its columns A2 of the groups of layer l - 1)
are balanced jointly by minimising, over u_i = log alpha_i,

    G(u) = sum_e theta_e^2 exp(2 sum_i u_i D_ie)  -  sum_{scale groups s} r^2 * 2 u_s

(the second term only when `scale_norm` = r is given). G is convex (a sum of exponentials of linear forms
plus a linear term). Its partial derivatives are dG/du_i = 2 (N1_i - N2_i) for a rescale group and
2 (N_s - r^2) for a scale group (N_s = |theta_A|^2 at the current point), so a stationary point is exactly
"every rescale group balanced and every scale group of norm r". Exact minimisation along one coordinate is
the closed form above (alpha^4 = N2 / N1; alpha^2 = r^2 / N_s), so `balance` alternates these updates over
colour classes of pairwise disjoint groups (orbits.py): block coordinate descent on a smooth convex function,
which decreases G at every step.

Convergence criterion: every group's relative stationarity residual is at most `tol` (default 1e-10),

    rescale: |N1 - N2| / (N1 + N2)        scale: |N_s - r^2| / r^2,

measured on the float64 iterate after a full sweep. A float32 model receives that iterate cast to float32,
balanced to float32 rounding. Degenerate groups (N1 = 0 or N2 = 0: the infimum is at alpha -> 0 or infinity;
N_s = 0) are left in place and listed. Translation groups are not moved.

The function is unchanged: the result is a composition of group actions (certified in the tests in float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.uses.orbits import (
    NOISE,
    CoreState,
    Orbits,
    SymmetryUseError,
    float64_params,
    transform_model,
    young_omega,
)

__all__ = ["BalanceResult", "balance", "balance_params", "balance_with_result", "imbalance"]


@dataclass
class BalanceResult:
    """What `balance_params` did: sweeps, the final largest residual, and the groups it left alone."""

    sweeps: int
    residual: float
    """max over groups of the relative stationarity residual (see the module docstring)."""
    converged: bool
    skipped: list[str] = field(default_factory=list)
    """Degenerate groups left in place (an empty side, or a scale group of norm 0)."""


def _groups(symmetries: Iterable[Symmetry], scale_norm: float | None) -> list[Symmetry]:
    kinds = {"rescale"} | ({"scale"} if scale_norm is not None else set())
    return [s for s in symmetries if s.kind in kinds]


def _residual(orbits: Orbits, n1: Tensor, n2: Tensor, target: float | None, live: Tensor) -> Tensor:
    res = torch.zeros_like(n1)
    resc = orbits.is_rescale & live
    res[resc] = (n1[resc] - n2[resc]).abs() / (n1[resc] + n2[resc])
    if target is not None:
        sc = orbits.is_scale & live
        res[sc] = (n1[sc] - target).abs() / target
    return res


def _step(orbits: Orbits, n1: Tensor, n2: Tensor, target: float | None, sel: Tensor) -> Tensor:
    """The exact coordinate minimiser, as log alpha, for the selected groups (0 elsewhere)."""
    u = orbits.zeros()
    resc = sel & orbits.is_rescale
    u[resc] = 0.25 * (n2[resc].log() - n1[resc].log())
    if target is not None:
        sc = sel & orbits.is_scale
        u[sc] = 0.5 * (math.log(target) - n1[sc].log())
    return u


def balance_params(params: dict[str, Tensor], symmetries: Iterable[Symmetry], *, scale_norm: float | None = None,
                   tol: float = 1e-10, max_sweeps: int = 10_000) -> BalanceResult:
    """Balance a float64 parameter dict in place (see the module docstring); returns what was done.

    Acceleration: the plain sweep (omega = 1) converges linearly, slowly on deep chains (the rate of red-black
    Gauss-Seidel on a path of L layers, 1 - O(1/L^2) per sweep). After a few plain sweeps the rate rho is
    estimated from successive residuals (once their ratio has settled) and the steps are over-relaxed by Young's
    omega = 2 / (1 + sqrt(1 - rho)) (successive over-relaxation, `orbits.young_omega`). An over-relaxed rescale
    step still decreases G (along one coordinate G is a + b cosh(2 (u - u*)), symmetric about the minimiser,
    so any omega in (0, 2) lands lower); a scale step need not. Safeguard: G is evaluated before and after
    every sweep; a sweep that increases it (beyond float64 rounding of the sum) is undone and the descent
    continues with omega = 1 for good, which is monotone.
    """
    if scale_norm is not None and not scale_norm > 0:
        raise SymmetryUseError(f"scale_norm must be > 0, got {scale_norm}", "pass the target |theta_A| or None")
    if tol <= 0 or max_sweeps < 1:
        raise SymmetryUseError("tol must be > 0 and max_sweeps >= 1", "e.g. tol=1e-10, max_sweeps=10000")
    groups = _groups(symmetries, scale_norm)
    if not groups:
        return BalanceResult(0, 0.0, True)
    orbits = Orbits(groups, params)
    state = CoreState(orbits, params)
    target = None if scale_norm is None else float(scale_norm) ** 2
    n1, n2 = state.squares()
    live = torch.where(orbits.is_rescale, (n1 > 0) & (n2 > 0), n1 > 0)
    skipped = [g.name for g, ok in zip(groups, live.tolist(), strict=True) if not ok]
    residual = float(_residual(orbits, n1, n2, target, live).max())
    scale_log = orbits.zeros()  # accumulated log alpha of scale groups (G's linear term)

    def objective() -> float:
        linear = 0.0 if target is None else 2 * target * float(scale_log[orbits.is_scale].sum())
        return state.total_square() - linear

    omega, history, accelerate = 1.0, [residual], True
    sweeps = 0
    while residual > tol and sweeps < max_sweeps:
        sweeps += 1
        saved, saved_scale, g0 = state.snapshot(), scale_log.clone(), objective()
        for colour in orbits.colors:
            sel = orbits.selected(colour)
            n1, n2 = state.squares()
            u = omega * _step(orbits, n1, n2, target, sel & live)
            state.multiply(u)
            scale_log += torch.where(orbits.is_scale, u, 0.0)
        if omega > 1 and objective() > g0 + NOISE * abs(g0):
            state.restore(saved)
            scale_log = saved_scale
            omega, accelerate = 1.0, False
            continue
        n1, n2 = state.squares()
        residual = float(_residual(orbits, n1, n2, target, live).max())
        history.append(residual)
        if accelerate and omega == 1.0 and len(history) >= 5:
            omega = young_omega([history[i] / history[i - 1] if history[i - 1] else 0.0 for i in range(-4, 0)])
    state.apply(params)
    return BalanceResult(sweeps, residual, residual <= tol, skipped)




def balance(model: nn.Module, symmetries: Iterable[Symmetry], *, inplace: bool = False,
            scale_norm: float | None = None, tol: float = 1e-10, max_sweeps: int = 10_000) -> nn.Module:
    """A copy of `model` (or the model itself, inplace=True) with every rescale group balanced.

    Balanced: |theta_A1| = |theta_A2| for every rescale group, jointly for overlapping groups (the minimum-norm
    point of the orbit); with `scale_norm` = r also |theta_A| = r for every scale group. Stops when every
    group's relative residual is <= tol (module docstring) or after max_sweeps sweeps (then a RuntimeWarning
    says how far it got). The function the model computes is unchanged; only certified groups should be
    passed (`nm.certify`).
    """
    return balance_with_result(model, symmetries, inplace=inplace, scale_norm=scale_norm, tol=tol,
                               max_sweeps=max_sweeps)[0]


def balance_with_result(model: nn.Module, symmetries: Iterable[Symmetry], *, inplace: bool = False,
                        scale_norm: float | None = None, tol: float = 1e-10,
                        max_sweeps: int = 10_000) -> tuple[nn.Module, BalanceResult]:
    """`balance`, and what it did (sweeps, final residual, skipped degenerate groups)."""
    syms = list(symmetries)
    return transform_model(
        model, inplace,
        lambda params: balance_params(params, syms, scale_norm=scale_norm, tol=tol, max_sweeps=max_sweeps),
        _touched(syms, scale_norm), "balance")


def _touched(symmetries: Iterable[Symmetry], scale_norm: float | None) -> list[str]:
    return list(dict.fromkeys(p for s in _groups(symmetries, scale_norm) for p in s.params))


def imbalance(model: nn.Module, symmetries: Iterable[Symmetry]) -> dict[str, float]:
    """Per rescale group, |N1 - N2| / (N1 + N2) with N1 = |theta_A1|^2, N2 = |theta_A2|^2 (0 = balanced).

    Groups with N1 + N2 = 0 are left out.
    """
    groups = [s for s in symmetries if s.kind == "rescale"]
    if not groups:
        return {}
    params = float64_params(model)
    n1, n2 = CoreState(Orbits(groups, params), params).squares()
    total = n1 + n2
    rel = (n1 - n2).abs() / total.clamp_min(torch.finfo(torch.float64).tiny)
    return {g.name: float(r) for g, r, t in zip(groups, rel.tolist(), total.tolist(), strict=True) if t > 0}
