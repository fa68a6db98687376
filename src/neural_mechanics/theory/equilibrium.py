"""Equilibria of quadratic charges under SGD + weight decay (docs/theory.md section 3, end).

Weight decay shrinks a scale-invariant group while the gradient, orthogonal to theta_A, inflates it; the two
balance. Averaging the exact recurrence C_{k+1} = (1 - eta lambda)^2 C_k + eta^2 <g, D g> over a stationary
stretch gives

    C_eq = eta <g, D g> / (2 lambda - eta lambda^2)                           (plain SGD)

and each step then rotates theta_A by an angle phi with sin phi = eta |g_A| / |theta_A| = sqrt(2 eta lambda -
eta^2 lambda^2), i.e. phi = arccos(1 - eta lambda) exactly (the angle between theta_k and theta_{k+1}, the one
definition of the angular update: `theory/identity.py`). Since |g_A|^2 |theta_A|^2 does not depend on |theta_A|
(scale invariance), the equilibrium a group is drawn to from its current S is the fixed point
sqrt(S S_eq(g)) (`scale_fixed_point`). For heavy ball with dampening tau, averaging the exact momentum
recurrence (Q = beta P + (1 - tau) lambda C, P = Q - eta |b|^2, 2 Q = eta |b|^2 in the mean) gives, exactly in
time average,

    C_eq = eta (1 + beta) <b, D b> / (2 lambda (1 - tau)),
    |delta theta_A|^2 / |theta_A|^2 = 2 eta lambda (1 - tau) / (1 + beta)

(the paper's sqrt(2 eta lambda / (1 + beta)) at tau = 0; that is the whole step, whose tangential part, the
angle, agrees with it to leading order in eta lambda); all of it needs dampening tau < 1 (at tau = 1 the gradient
never enters the buffer and there is no equilibrium). The effective learning rate of a scale-invariant group is eta / S.
All functions take tensors, floats or numpy arrays and broadcast (float64 tensors out).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "angular_update",
    "effective_lr",
    "norm_relaxation_rate",
    "relaxation_steps",
    "scale_equilibrium",
    "scale_equilibrium_from_grad",
    "scale_equilibrium_momentum",
    "scale_fixed_point",
]

Num = Tensor | float | np.ndarray


def _f64(x: Num) -> Tensor:
    """x as a float64 tensor (a numpy array is copied: it may be read-only, e.g. a pandas column's values)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, dtype=np.float64))
    return torch.as_tensor(x, dtype=torch.float64)


def scale_equilibrium(lr: Num, weight_decay: Num, grad_sq: Num) -> Tensor:
    """S_eq = eta <g, D g> / (2 lambda - eta lambda^2): the fixed point of plain SGD's charge recurrence."""
    lr, wd, g = (_f64(x) for x in (lr, weight_decay, grad_sq))
    return lr * g / (2 * wd - lr * wd * wd)


def scale_equilibrium_momentum(lr: Num, weight_decay: Num, velocity_sq: Num, momentum: Num,
                               dampening: Num = 0.0) -> Tensor:
    """S_eq = eta (1 + beta) <b, D b> / (2 lambda (1 - tau)), in terms of the momentum buffer b.

    Exact for time averages of the discrete heavy-ball recurrence; reduces to the plain-SGD value at beta = 0
    (where b = d and <d, D d> = <g, D g> + lambda^2 S).
    """
    lr, wd, v, beta, tau = (_f64(x) for x in (lr, weight_decay, velocity_sq, momentum, dampening))
    return lr * (1 + beta) * v / (2 * wd * (1 - tau))


def scale_equilibrium_from_grad(lr: Num, weight_decay: Num, grad_sq: Num, momentum: Num = 0.0,
                                dampening: Num = 0.0) -> Tensor:
    """S_eq from the gradient: `scale_equilibrium` at beta = 0, else eta (1 - tau) <g, D g> / (2 lambda (1 - beta)).

    With momentum, minibatch gradients uncorrelated across steps give E<b, D b> = (1 - tau)^2 <g, D g> / (1 - beta^2),
    and `scale_equilibrium_momentum` becomes this (the plain-SGD value with eta -> eta (1 - tau) / (1 - beta)).
    What a figure can draw from a run's logged gradient norms alone.
    """
    lr, wd, g, beta, tau = (_f64(x) for x in (lr, weight_decay, grad_sq, momentum, dampening))
    sgd = lr * g / (2 * wd - lr * wd * wd)
    mom = lr * (1 - tau) * g / (2 * wd * (1 - beta))
    return torch.where(beta == 0, sgd, mom)


def norm_relaxation_rate(lr: Num, weight_decay: Num, momentum: Num = 0.0, dampening: Num = 0.0) -> Tensor:
    """a in (1/S) dS/dt = a (S_eq / S - 1), time t = eta k: the pull of a scale charge towards its equilibrium.

    beta = 0: a = 2 lambda - eta lambda^2, exact in expectation (divide S_{k+1} - S_k = -(2 eta lambda - eta^2
    lambda^2) S_k + eta^2 <g, D g> by eta S_k and use `scale_equilibrium`); beta > 0: a = 2 lambda (1 - tau) /
    (1 - beta), leading order in eta lambda (the weight decay is carried by the buffer).
    """
    lr, wd, beta, tau = (_f64(x) for x in (lr, weight_decay, momentum, dampening))
    return torch.where(beta == 0, 2 * wd - lr * wd * wd, 2 * wd * (1 - tau) / (1 - beta))


def scale_fixed_point(charge: Num, charge_eq: Num) -> Tensor:
    """sqrt(S S_eq): the SGD equilibrium of a scale group given S_eq from its gradient at the current S.

    |g_A|^2 scales as 1 / S at a fixed direction (scale invariance), so S_eq(g) = c / S and the fixed point of
    S = c / S is sqrt(c) = sqrt(S S_eq(g)); equal to S_eq(g) at equilibrium.
    """
    return torch.sqrt(_f64(charge).abs() * _f64(charge_eq).abs())


def angular_update(lr: Num, weight_decay: Num, momentum: Num = 0.0, dampening: Num = 0.0) -> Tensor:
    """The angle (radians) between theta_k and theta_{k+1} of a scale-invariant group at equilibrium.

    beta = 0: arcsin sqrt(2 eta lambda - eta^2 lambda^2) = arccos(1 - eta lambda) (exact);
    beta > 0: sqrt(2 eta lambda (1 - tau) / (1 + beta)) (leading order in eta lambda; exact in the mean for the
    whole step |delta theta_A| / |theta_A|).
    """
    lr, wd, beta, tau = (_f64(x) for x in (lr, weight_decay, momentum, dampening))
    sgd = torch.asin(torch.sqrt((2 * lr * wd - lr * lr * wd * wd).clamp(0.0, 1.0)))
    mom = torch.sqrt(2 * lr * wd * (1 - tau) / (1 + beta))
    return torch.where(beta == 0, sgd, mom)


def effective_lr(lr: Num, charge: Num) -> Tensor:
    """eta / S: the learning rate a scale-invariant group feels on its unit sphere."""
    return _f64(lr) / _f64(charge)


def relaxation_steps(lr: Num, weight_decay: Num, momentum: Num = 0.0, dampening: Num = 0.0) -> Tensor:
    """Steps for a quadratic charge to relax by e^-1 towards equilibrium: -1 / (2 log |r|), r the slowest root.

    Without gradient the update is linear: plain SGD theta_{k+1} = (1 - eta lambda) theta_k, so r = 1 - eta lambda;
    heavy ball theta_{k+1} - theta_k = beta (theta_k - theta_{k-1}) - eps theta_k with eps = eta lambda (1 - tau), so r
    solves r^2 - (1 + beta - eps) r + beta = 0 (|r| = sqrt(beta) when the roots are complex). For eta lambda << 1 this
    is ~ 1 / (2 eta lambda) and ~ (1 - beta) / (2 eta lambda (1 - tau)) (the slow mode of the paper's oscillator).
    """
    lr, wd, beta, tau = (_f64(x) for x in (lr, weight_decay, momentum, dampening))
    eps = lr * wd * (1 - tau)
    tr = 1 + beta - eps
    disc = tr * tr - 4 * beta
    r_mom = torch.where(disc >= 0, (tr + torch.sqrt(disc.clamp(min=0))) / 2, torch.sqrt(beta))
    r = torch.where(beta == 0, (1 - lr * wd).abs(), r_mom)
    return -1 / (2 * torch.log(r))
