"""Equilibria of scale groups under decoupled weight decay: AdamW, Lion, Muon (docs/theory.md section 6.3).

A step is theta_{k+1} = a theta_k - eta u_k with a = 1 - eta lambda (`theory/identity.py`). The model of the
noise-dominated regime (Kosson, Messmer and Jaggi, "Rotational Equilibrium", ICML 2024): the optimizer forms a
linear momentum filter of the gradients,

    z_k = sum_{j >= 0} c_j n_{k-j},     c_0 = p,  c_j = q beta^{j-1} (j >= 1)            (`MomentumFilter`)

of normalised gradients n (zero mean, uncorrelated across steps, independent of the parameters they were taken
at), then maps it to the update u_k = f(z_k): Adam divides by sqrt(v) (linear, f(z) = z), Lion takes the sign,
Muon orthogonalises the matrix. Writing u = kappa z + (a part uncorrelated with every n), the *correlated
fraction* rho = kappa^2 E|z|^2 / E|u|^2 is 1 for Adam, 2 / pi for the sign of a Gaussian (Bussgang), and that of
Newton-Schulz for a Gaussian matrix for Muon (`orthogonalized_statistics`). Unrolling
theta_k = a^j theta_{k-j} - eta sum_{l=1..j} a^{l-1} u_{k-l} gives, exactly in the model,

    E <theta_k, u_k>_A = -eta r E|u|^2_A,      r = rho F1(a) / F0,
    F0 = sum c_j^2 = p^2 + q^2 / (1 - beta^2),
    F1(a) = sum_{j >= 1} sum_{l=1..j} c_j c_{j-l} a^{l-1} = (p q + q^2 beta / (1 - beta^2)) / (1 - a beta),

and averaging the identity S_{k+1} = a^2 S_k - 2 eta a X_k + eta^2 U_k over a stationary stretch,

    S_eq = eta^2 U (1 + 2 a r) / (1 - a^2)                                      (`equilibrium_charge`)
    sin^2(angle_eq) = eta^2 |u_perp|^2 / S_eq = s^2 (1 - r^2 s^2),              (`equilibrium_angle`)
    s^2 = (1 - a^2) / (1 + 2 a r)

(|u_perp|^2 = U - X^2 / S, the mean X removed; the step's angle is the one of `identity.rotation_angle`). For
Adam's EMA (p = 1 - beta1, q = p beta1, beta = beta1) r = beta1 / (1 - a beta1), so
S_eq = eta^2 U (1 + a beta1) / ((1 - a beta1)(1 - a^2)) and to leading order in eta lambda
angle_eq = sqrt(2 eta lambda (1 - beta1) / (1 + beta1)), S_eq = eta C / (2 lambda) with U = C (1 - beta1) / (1 + beta1)
for C unit-variance entries. The angle does not depend on U: the same in every layer.

Away from equilibrium the norm decays as a^k (no gradient), an e-fold every -1 / log a ~ 1 / (eta lambda) steps
(`norm_relaxation_time`); a run shorter than a few of those is not at equilibrium yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LION_RHO", "MomentumFilter", "cross_ratio", "equilibrium_angle", "equilibrium_charge",
           "norm_relaxation_time", "orthogonalized_statistics"]

Num = Tensor | float

LION_RHO = 2 / math.pi
"""Correlated fraction of sign(z) for Gaussian z: E[sign(z) z]^2 / E[z^2] = 2 / pi (Bussgang's theorem)."""


def _t(x: Num) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


@dataclass(frozen=True)
class MomentumFilter:
    """The linear filter z_k = sum_j c_j n_{k-j} an optimizer applies to its gradients: c_0 = p, c_j = q beta^{j-1}."""

    p: float
    q: float
    beta: float

    @classmethod
    def ema(cls, beta: float) -> MomentumFilter:
        """m_k = beta m_{k-1} + (1 - beta) g_k (Adam's first moment, Muon without Nesterov): c_j = (1 - beta) beta^j."""
        return cls(1 - beta, (1 - beta) * beta, beta)

    @classmethod
    def nesterov_ema(cls, mu: float) -> MomentumFilter:
        """torch's Muon with Nesterov: B_k = lerp(B_{k-1}, g_k, 1 - mu), z_k = lerp(g_k, B_k, mu):
        c_0 = 1 - mu^2, c_j = (1 - mu) mu^{j+1}."""
        return cls(1 - mu * mu, (1 - mu) * mu * mu, mu)

    @classmethod
    def lion(cls, beta1: float, beta2: float) -> MomentumFilter:
        """Lion: z_k = beta1 m_{k-1} + (1 - beta1) g_k, m_k = beta2 m_{k-1} + (1 - beta2) g_k:
        c_0 = 1 - beta1, c_j = beta1 (1 - beta2) beta2^{j-1}."""
        return cls(1 - beta1, beta1 * (1 - beta2), beta2)

    @property
    def f0(self) -> float:
        """sum_j c_j^2 = p^2 + q^2 / (1 - beta^2)."""
        return self.p ** 2 + self.q ** 2 / (1 - self.beta ** 2)

    def f1(self, a: Num) -> Tensor:
        """sum_{j >= 1} sum_{l = 1..j} c_j c_{j-l} a^{l-1} = (p q + q^2 beta / (1 - beta^2)) / (1 - a beta)."""
        num = self.p * self.q + self.q ** 2 * self.beta / (1 - self.beta ** 2)
        return num / (1 - _t(a) * self.beta)


def cross_ratio(filt: MomentumFilter, a: Num, rho: Num = 1.0) -> Tensor:
    """r = rho F1(a) / F0: E<theta_k, u_k>_A = -eta r E|u|^2_A in the noise-dominated model."""
    return _t(rho) * filt.f1(a) / filt.f0


def equilibrium_charge(lr: Num, a: Num, update_sq: Num, r: Num) -> Tensor:
    """S_eq = eta^2 U (1 + 2 a r) / (1 - a^2): the stationary point of the identity with E X = -eta r U."""
    lr, a, U, r = _t(lr), _t(a), _t(update_sq), _t(r)
    return lr * lr * U * (1 + 2 * a * r) / (1 - a * a)


def equilibrium_angle(a: Num, r: Num) -> Tensor:
    """The equilibrium angle between theta_k and theta_{k+1}: arcsin sqrt(s^2 (1 - r^2 s^2)), s^2 = (1 - a^2)/(1 + 2ar).

    r = 0 (plain SGD on an exact symmetry, decoupled reading) gives arccos(a) exactly.
    """
    a, r = _t(a), _t(r)
    s2 = (1 - a * a) / (1 + 2 * a * r)
    return torch.asin(torch.sqrt((s2 * (1 - r * r * s2)).clamp(0.0, 1.0)))


def norm_relaxation_time(a: Num) -> Tensor:
    """-1 / log|a| ~ 1 / (eta lambda): steps for the norm to shrink by e under the decay alone (inf for a = 1)."""
    a = _t(a).abs()
    return torch.where(a < 1, -1 / torch.log(a.clamp_min(1e-300)), torch.full_like(a, math.inf))


def orthogonalized_statistics(shape: tuple[int, int], orthogonalize: Callable[[Tensor], Tensor], *,
                              samples: int = 4, seed: int = 0) -> tuple[float, float]:
    """(rho, E|O|^2 / entries) of O = orthogonalize(Z) for Gaussian Z of `shape`, by Monte Carlo (seeded).

    rho = E<O, Z>^2 / (E|Z|^2 E|O|^2) is the correlated fraction of the map (1 for the identity; for the exact
    polar factor of a square Gaussian matrix (8 / 3 pi)^2 = 0.72, tending to 1 for very thin matrices). Large
    matrices self-average, so fewer samples are drawn for them (at least one).
    """
    gen = torch.Generator().manual_seed(seed)
    n = max(1, min(samples, int(2 ** 16 // max(1, shape[0] * shape[1] // 64) + 1)))
    zo = zz = oo = 0.0
    for _ in range(n):
        z = torch.randn(shape, generator=gen, dtype=torch.float32)
        o = orthogonalize(z).to(torch.float64)
        z64 = z.to(torch.float64)
        zo += float((o * z64).sum())
        zz += float((z64 * z64).sum())
        oo += float((o * o).sum())
    rho = (zo / n) ** 2 / ((zz / n) * (oo / n))
    return rho, oo / n / (shape[0] * shape[1])
