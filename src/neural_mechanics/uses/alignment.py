"""`distance_up_to_symmetry`: how far apart two checkpoints are once the symmetry is quotiented out.

Two parameter vectors on one orbit compute the same function, yet their plain distance |theta_a - theta_b|
can be anything. The distance up to symmetry is the distance from theta_b to the closest point of the orbit
of theta_a,

    d = min over the group |psi(theta_a) - theta_b|,

and the aligned copy is that closest point (a model computing exactly what model_a computes). Per group,
with the others held fixed, the best factor has a closed form (a = theta_a on the group, b = theta_b):

* translation: min_t |a + t 1_A - b|^2 -> t = mean over A of (b - a).
* scale: min_{alpha > 0} |alpha a - b|^2 = alpha^2 |a|^2 - 2 alpha <a, b> + |b|^2 -> alpha = <a, b> / |a|^2 when
  <a, b> > 0. When <a, b> <= 0 the infimum is at alpha -> 0, a degenerate point that is not a model: the group
  is left where it is and listed in `unaligned`.
* rescale: f(alpha) = |alpha a1 - b1|^2 + |a2 / alpha - b2|^2
  = alpha^2 A1 - 2 alpha P1 + A2 / alpha^2 - 2 P2 / alpha + const, with A_k = |a_k|^2, P_k = <a_k, b_k>.
  f -> infinity at both ends of (0, infinity) (when A1, A2 > 0), so its minimum is a stationary point:
  f'(alpha) = 0  <=>  A1 alpha^4 - P1 alpha^3 + P2 alpha - A2 = 0, a quartic with up to three positive roots
  (two local minima). Solved robustly: substitute alpha = s beta with s = (A2 / A1)^(1/4) (the balance point),
  which makes the quartic monic with constant term -1 and O(1) coefficients,
  beta^4 - (P1 s^3 / A2) beta^3 + (P2 s / A2) beta - 1 = 0; take every root of its companion matrix (batched
  eigenvalues over all groups), keep the real positive ones, polish each by two Newton steps, and pick the
  candidate of least f, alpha = 1 (no move) included, so a step never increases the distance.

Groups overlap (a classifier column is in a translation group and in a rescale group; the rows and columns
of one layer belong to different rescale groups), so the factors are found by coordinate descent over
colour classes of pairwise disjoint groups (orbits.py): every step is an exact minimisation along the
orbit coordinates of its groups, hence the distance never increases, and the point stays on the orbit of
theta_a (a composition of group actions). Strongly coupled groups (a column's translation and its rescale)
make plain sweeps slow, so once their rate has settled the steps are over-relaxed (`orbits.young_omega`:
shift omega t*, factor alpha*^omega); a sweep that increases the distance is undone and the descent goes on
with plain steps, so the distance still never increases. Stopping rule: a sweep lowers the squared distance
by less than rtol (relative), or max_sweeps. The result is a local minimum along the group coordinates, an
upper bound on the true orbit distance and never above the plain distance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.uses.orbits import NOISE, Orbits, SymmetryUseError, float64_params, write_back, young_omega

__all__ = ["Alignment", "best_rescale_factor", "distance_up_to_symmetry"]


@dataclass
class Alignment:
    """The result of `distance_up_to_symmetry`."""

    distance: float
    """|aligned - theta_b| over all parameters (float64)."""
    plain_distance: float
    """|theta_a - theta_b|."""
    aligned: nn.Module
    """A copy of model_a moved along its orbit to the closest point found (same function as model_a)."""
    sweeps: int
    norm_b: float = 0.0
    """|theta_b|."""
    unaligned: list[str] = field(default_factory=list)
    """Groups left in place at the end: degenerate (a side that is all zero) or anti-aligned scale groups
    (<a, b> <= 0)."""

    @property
    def relative(self) -> float:
        """distance / |theta_b| (0 when theta_b is 0)."""
        return self.distance / self.norm_b if self.norm_b else 0.0


def _rescale_gain(alpha: Tensor, a1: Tensor, p1: Tensor, a2: Tensor, p2: Tensor) -> Tensor:
    """f(alpha) - f(1) for f(alpha) = alpha^2 a1 - 2 alpha p1 + a2 / alpha^2 - 2 p2 / alpha, written as
    (alpha - 1)(a1 (alpha + 1) - 2 p1) + (1/alpha - 1)(a2 (1/alpha + 1) - 2 p2): no cancellation between the
    O(|f|) terms, so candidates within sqrt(eps) of alpha = 1 are still told apart."""
    inv = 1 / alpha
    return (alpha - 1) * (a1 * (alpha + 1) - 2 * p1) + (inv - 1) * (a2 * (inv + 1) - 2 * p2)


def best_rescale_factor(a1: Tensor, p1: Tensor, a2: Tensor, p2: Tensor) -> Tensor:
    """argmin over alpha > 0 of alpha^2 a1 - 2 alpha p1 + a2 / alpha^2 - 2 p2 / alpha, per entry (a1, a2 > 0),
    among the real positive stationary points and alpha = 1 (see the module docstring)."""
    s = (a2 / a1) ** 0.25
    c3 = -(p1 * s**3 / a2)
    c1 = p2 * s / a2
    n = a1.numel()
    comp = torch.zeros((n, 4, 4), dtype=torch.float64, device=a1.device)
    comp[:, 1, 0] = comp[:, 2, 1] = comp[:, 3, 2] = 1.0
    comp[:, 0, 3] = 1.0  # -c0 with c0 = -1
    comp[:, 1, 3] = -c1
    comp[:, 2, 3] = 0.0  # -c2 with c2 = 0
    comp[:, 3, 3] = -c3
    roots = torch.linalg.eigvals(comp)  # [n, 4] complex
    beta = roots.real.clone()
    real = (roots.imag.abs() <= 1e-7 * roots.abs().clamp_min(1.0)) & (beta > 0)
    beta = torch.where(real, beta, torch.ones_like(beta))
    for _ in range(2):  # Newton on q(beta) = beta^4 + c3 beta^3 + c1 beta - 1
        q = beta**4 + c3[:, None] * beta**3 + c1[:, None] * beta - 1
        dq = 4 * beta**3 + 3 * c3[:, None] * beta**2 + c1[:, None]
        step = torch.where(dq.abs() > 0, q / dq, torch.zeros_like(q))
        beta = torch.where(real & ((beta - step) > 0), beta - step, beta)
    one = torch.ones((n, 1), dtype=torch.float64, device=a1.device)
    cand = torch.cat([beta * s[:, None], one], dim=1)
    cand = torch.where(torch.cat([real, one.bool()], 1), cand, torch.ones_like(cand))
    f = _rescale_gain(cand, a1[:, None], p1[:, None], a2[:, None], p2[:, None])
    return cand.gather(1, f.argmin(1, keepdim=True)).squeeze(1)


def _check_same_shapes(pa: dict[str, Tensor], pb: dict[str, Tensor]) -> None:
    if pa.keys() != pb.keys():
        missing = sorted(set(pa) ^ set(pb))[:5]
        raise SymmetryUseError(f"the two models have different parameters (e.g. {missing})",
                               "compare two checkpoints of the same architecture")
    bad = [n for n in pa if pa[n].shape != pb[n].shape]
    if bad:
        raise SymmetryUseError(f"parameter {bad[0]!r} has shape {tuple(pa[bad[0]].shape)} in model_a and "
                               f"{tuple(pb[bad[0]].shape)} in model_b",
                               "compare two checkpoints of the same architecture")


def _sq_dist(pa: dict[str, Tensor], pb: dict[str, Tensor]) -> float:
    return float(sum(float(((pa[n] - pb[n]) ** 2).sum()) for n in pa))


def distance_up_to_symmetry(model_a: nn.Module, model_b: nn.Module, symmetries: Iterable[Symmetry], *,
                            rtol: float = 1e-12, max_sweeps: int = 500) -> Alignment:
    """The distance from model_b to the orbit of model_a under `symmetries`, and the aligned copy of model_a.

    symmetries: certified groups of model_a's architecture (names as in named_parameters). See the module
    docstring for the closed forms, the coordinate descent and the stopping rule. Both models are left as
    they are; `Alignment.aligned` is a deep copy of model_a.
    """
    syms = list(symmetries)
    if rtol <= 0 or max_sweeps < 1:
        raise SymmetryUseError("rtol must be > 0 and max_sweeps >= 1", "e.g. rtol=1e-12, max_sweeps=500")
    pa = float64_params(model_a)
    pb = float64_params(model_b)
    _check_same_shapes(pa, pb)
    plain = _sq_dist(pa, pb)
    norm_b = math.sqrt(sum(float((t**2).sum()) for t in pb.values()))
    aligned = copy.deepcopy(model_a)
    if not syms:
        return Alignment(math.sqrt(plain), math.sqrt(plain), aligned, 0, norm_b)
    orbits = Orbits(syms, pa)
    sizes = orbits.sizes()
    current, sweeps, omega, accelerate = plain, 0, 1.0, True
    decreases: list[float] = []
    unaligned: set[str] = set()
    while sweeps < max_sweeps:
        sweeps += 1
        saved = {n: pa[n].clone() for n in orbits.params}
        for colour in orbits.colors:
            sel = orbits.selected(colour)
            _step(orbits, pa, pb, sel, sizes, unaligned, omega)
        new = _sq_dist(pa, pb)
        if omega > 1 and new > current + NOISE * current:  # the over-relaxed sweep went uphill: undo, plain from now
            pa.update(saved)
            omega, accelerate = 1.0, False
            continue
        decreases.append(max(current - new, 0.0))
        done = current - new <= rtol * max(current, torch.finfo(torch.float64).tiny)
        current = new
        if done:
            break
        if accelerate and omega == 1.0 and len(decreases) >= 5 and min(decreases[-5:]) > 0:
            # the squared distance converges like rho^(2k): its decreases shrink by rho^2 per sweep
            omega = young_omega([math.sqrt(decreases[i] / decreases[i - 1]) for i in range(-4, 0)])
    write_back(aligned, pa, orbits.params)
    return Alignment(math.sqrt(current), math.sqrt(plain), aligned, sweeps, norm_b, sorted(unaligned))


def _step(orbits: Orbits, pa: dict[str, Tensor], pb: dict[str, Tensor], sel: Tensor, sizes: Tensor,
          unaligned: set[str], omega: float) -> None:
    """One block step for the (pairwise disjoint) selected groups: the exact minimiser, over-relaxed by omega
    (shift omega t*, factor alpha*^omega)."""
    (a_sq, ab, diff), (a2_sq, ab2, _) = orbits.side_sums(
        lambda name: [(pa[name], pa[name]), (pa[name], pb[name]), pb[name] - pa[name]], 3)
    log_alpha = orbits.zeros()
    shifts = orbits.zeros()
    trans = sel & orbits.is_translation
    shifts[trans] = diff[trans] / sizes[trans]
    scale = sel & orbits.is_scale
    ok = scale & (ab > 0) & (a_sq > 0)
    log_alpha[ok] = (ab[ok] / a_sq[ok]).log()
    resc = sel & orbits.is_rescale
    live = resc & (a_sq > 0) & (a2_sq > 0)
    if bool(live.any()):
        alpha = best_rescale_factor(a_sq[live], ab[live], a2_sq[live], ab2[live])
        log_alpha[live] = alpha.log()
    stuck = (scale & ~ok) | (resc & ~live)
    for i in torch.nonzero(sel & (orbits.is_scale | orbits.is_rescale)).flatten().tolist():
        (unaligned.add if bool(stuck[i]) else unaligned.discard)(orbits.symmetries[i].name)
    orbits.multiply(pa, omega * log_alpha)
    orbits.shift(pa, omega * shifts)
