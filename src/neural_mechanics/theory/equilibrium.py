"""Equilibria of quadratic charges under SGD + weight decay (docs/theory.md section 3, end).

Weight decay shrinks a scale-invariant group while the gradient, orthogonal to theta_A, inflates it; the two
balance. Averaging the exact recurrence C_{k+1} = (1 - eta lambda)^2 C_k + eta^2 <g, D g> over a stationary
stretch gives

    C_eq = eta <g, D g> / (2 lambda - eta lambda^2)                           (plain SGD)

and each step then rotates theta_A by an angle phi with sin phi = eta |g_A| / |theta_A| = sqrt(2 eta lambda -
eta^2 lambda^2) (and cos phi = 1 - eta lambda). For heavy ball with dampening tau, averaging the exact momentum
recurrence (Q = beta P + (1 - tau) lambda C, P = Q - eta |b|^2, 2 Q = eta |b|^2 in the mean) gives, exactly in
time average,

    C_eq = eta (1 + beta) <b, D b> / (2 lambda (1 - tau)),
    |delta theta_A|^2 / |theta_A|^2 = 2 eta lambda (1 - tau) / (1 + beta)

(the paper's sqrt(2 eta lambda / (1 + beta)) at tau = 0; that is the whole step, whose tangential part is
the angular update up to O(eta lambda)). The effective learning rate of a scale-invariant group is eta / S.
All functions take tensors (or floats) and broadcast.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "angular_update",
    "effective_lr",
    "relaxation_steps",
    "scale_equilibrium",
    "scale_equilibrium_momentum",
]

Num = Tensor | float


def scale_equilibrium(lr: Num, weight_decay: Num, grad_sq: Num) -> Tensor:
    """S_eq = eta <g, D g> / (2 lambda - eta lambda^2): the fixed point of plain SGD's charge recurrence."""
    lr, wd, g = (torch.as_tensor(x, dtype=torch.float64) for x in (lr, weight_decay, grad_sq))
    return lr * g / (2 * wd - lr * wd * wd)


def scale_equilibrium_momentum(lr: Num, weight_decay: Num, velocity_sq: Num, momentum: Num,
                               dampening: Num = 0.0) -> Tensor:
    """S_eq = eta (1 + beta) <b, D b> / (2 lambda (1 - tau)), in terms of the momentum buffer b.

    Exact for time averages of the discrete heavy-ball recurrence; reduces to the plain-SGD value at beta = 0
    (where b = d and <d, D d> = <g, D g> + lambda^2 S).
    """
    lr, wd, v, beta, tau = (torch.as_tensor(x, dtype=torch.float64)
                            for x in (lr, weight_decay, velocity_sq, momentum, dampening))
    return lr * (1 + beta) * v / (2 * wd * (1 - tau))


def angular_update(lr: Num, weight_decay: Num, momentum: Num = 0.0, dampening: Num = 0.0) -> Tensor:
    """Per-step rotation of a scale-invariant group at equilibrium.

    beta = 0: sin(angle) = sqrt(2 eta lambda - eta^2 lambda^2) (exact);
    beta > 0: |delta theta_A| / |theta_A| = sqrt(2 eta lambda (1 - tau) / (1 + beta)) (whole step, exact in the mean).
    """
    lr, wd, beta, tau = (torch.as_tensor(x, dtype=torch.float64) for x in (lr, weight_decay, momentum, dampening))
    sgd = torch.sqrt(2 * lr * wd - lr * lr * wd * wd)
    mom = torch.sqrt(2 * lr * wd * (1 - tau) / (1 + beta))
    return torch.where(beta == 0, sgd, mom)


def effective_lr(lr: Num, charge: Num) -> Tensor:
    """eta / S: the learning rate a scale-invariant group feels on its unit sphere."""
    return torch.as_tensor(lr, dtype=torch.float64) / torch.as_tensor(charge, dtype=torch.float64)


def relaxation_steps(lr: Num, weight_decay: Num, momentum: Num = 0.0, dampening: Num = 0.0) -> Tensor:
    """Steps for a quadratic charge to relax by e^-1 towards equilibrium: -1 / (2 log |r|), r the slowest root.

    Without gradient the update is linear: plain SGD theta_{k+1} = (1 - eta lambda) theta_k, so r = 1 - eta lambda;
    heavy ball theta_{k+1} - theta_k = beta (theta_k - theta_{k-1}) - eps theta_k with eps = eta lambda (1 - tau), so r
    solves r^2 - (1 + beta - eps) r + beta = 0 (|r| = sqrt(beta) when the roots are complex). For eta lambda << 1 this
    is ~ 1 / (2 eta lambda) and ~ (1 - beta) / (2 eta lambda (1 - tau)) (the slow mode of the paper's oscillator).
    """
    lr, wd, beta, tau = (torch.as_tensor(x, dtype=torch.float64) for x in (lr, weight_decay, momentum, dampening))
    eps = lr * wd * (1 - tau)
    tr = 1 + beta - eps
    disc = tr * tr - 4 * beta
    r_mom = torch.where(disc >= 0, (tr + torch.sqrt(disc.clamp(min=0))) / 2, torch.sqrt(beta))
    r = torch.where(beta == 0, (1 - lr * wd).abs(), r_mom)
    return -1 / (2 * torch.log(r))
