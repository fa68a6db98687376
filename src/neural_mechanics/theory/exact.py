"""Exact discrete-time recurrences for the charges under torch.optim.SGD (docs/theory.md section 5).

torch.optim.SGD (torch/optim/sgd.py, `_single_tensor_sgd`; the foreach/fused paths compute the same) does,
per parameter and step k:

    d_k = g_k + lambda theta_k                       (g_k -> -g_k when maximize=True)
    b_0 = d_0  (the buffer is a clone of d: NO dampening on the first step)
    b_k = beta b_{k-1} + (1 - tau) d_k               (k >= 1)
    u_k = d_k  (beta == 0: no buffer, dampening ignored) | b_k (heavy ball) | d_k + beta b_k (Nesterov)
    theta_{k+1} = theta_k - eta_k u_k

For a quadratic charge C = <theta, D theta> (D = +1 on A, or +1 on A1 / -1 on A2) expand
C_{k+1} = C_k - 2 eta_k <D theta_k, u_k> + eta_k^2 <u_k, D u_k>. The symmetry makes B_k = <D theta_k, g_k> vanish,
so X_k := <D theta_k, d_k> = lambda C_k + B_k is known from the charge itself, and the momentum overlaps obey

    Q_k = <D theta_k, b_k>     = X_k (first buffered step) | beta P_k + (1 - tau) X_k
    P_{k+1} = <D theta_{k+1}, b_k> = Q_k - eta_k V_k,       V_k = <D u_k, b_k>
    <D theta_k, u_k> = X_k | Q_k | X_k + beta Q_k.

Only U_k = <u_k, D u_k> and V_k (= U_k for heavy ball) must be measured. The linear (translation) charge
T = <theta, 1_A> needs no measured input at all: X_k = lambda T_k + B_k, M_k = <1_A, b_k> follows the buffer rule.

Passing the measured breaking term B_k (zero for an exact symmetry) carries symmetry breaking (BatchNorm eps,
L1 penalties, eval-mode BN, ...) through the same recurrence; with B = None the prediction is "symmetry only".

Everything is vectorised over G groups (tensors [G]); per step there is no Python branching on data and no host
synchronisation (`torch.where` selects heavy ball / Nesterov / plain per group). The predicted charge, not the
measured one, is used inside the recurrence, so the prediction is a genuine forecast from C_0.

State tracks torch's per-parameter buffer: `started` says whether the group's buffers exist. A step with
momentum == 0 leaves torch's buffers untouched (b stays the last buffer b_old; a later momentum step continues
from it), so the linear overlap <1_A, b_old> stays put while the quadratic one moves with theta:
P_{k+1} = <D theta_{k+1}, b_old> = P_k - eta_k V_k with V_k = <D u_k, b_old> (u_k = d_k). Momentum schedules
(OneCycleLR's cycle_momentum, a switch to 0 and back) are therefore followed exactly. If you attach to an
optimizer that already holds momentum buffers, pass `overlap0 = <D theta_0, b_{-1}>` (or <1_A, b_{-1}>).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neural_mechanics.theory.hyper import Hyper, ResolvedHyper

__all__ = [
    "Hyper",
    "LinearRecurrence",
    "QuadraticRecurrence",
    "plain_linear_step",
    "plain_quadratic_step",
    "plain_sgd_charge",
]


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.float64)


def _signed(hp: ResolvedHyper, B: Tensor | None, like: Tensor) -> Tensor | float:
    """The breaking term as the optimizer sees it: B, or -B under maximize (torch steps along -g)."""
    if B is None:
        return 0.0
    B = B.to(like.dtype)
    return torch.where(hp.maximize, -B, B)


def _started0(charge: Tensor, overlap0: Tensor | None) -> tuple[Tensor, Tensor]:
    if overlap0 is None:
        return torch.zeros_like(charge), torch.zeros(charge.shape, dtype=torch.bool, device=charge.device)
    o = torch.as_tensor(overlap0, dtype=charge.dtype, device=charge.device).expand_as(charge).clone()
    return o, torch.ones(charge.shape, dtype=torch.bool, device=charge.device)


class _MomentumRecurrence:
    """State shared by the two recurrences: the predicted charge, the overlap of the charge's linear functional
    with the last momentum buffer, and whether the group's buffers exist (`started`); checkpointed together."""

    def __init__(self, charge0: Tensor, *, overlap0: Tensor | None = None):
        self.charge: Tensor = _float(torch.as_tensor(charge0)).clone()
        """Current predicted charge."""
        self.overlap, self.started = _started0(self.charge, overlap0)

    def _buffer_rule(self, r: ResolvedHyper, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """torch's buffer rule seen through the charge's functional <v, .> (v = D theta_k, or 1_A), from X = <v, d_k>.

        Returns (buffered, Q, du): buffered = (beta != 0); Q = <v, b_k> = X (first buffered step) | beta P + (1 - tau) X
        with P = `self.overlap`; du = <v, u_k> = X (no buffer) | Q (heavy ball) | X + beta Q (Nesterov).
        """
        beta, tau = r.momentum, r.dampening
        Q = torch.where(self.started, beta * self.overlap + (1 - tau) * X, X)
        buffered = beta != 0
        nesterov = r.nesterov & buffered
        du = torch.where(buffered, torch.where(nesterov, X + beta * Q, Q), X)
        return buffered, Q, du

    def state_dict(self) -> dict[str, Any]:
        return {"charge": self.charge.clone(), "overlap": self.overlap.clone(), "started": self.started.clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        dev = self.charge.device
        self.charge = d["charge"].to(dev).clone()
        self.overlap = d["overlap"].to(device=dev, dtype=self.charge.dtype).clone()
        self.started = d["started"].to(dev).clone()


class QuadraticRecurrence(_MomentumRecurrence):
    """Exact prediction of a scale / rescale charge C = <theta, D theta> under torch.optim.SGD, for G groups.

    `step(hp, U, V, B)` advances k -> k+1 and returns C_{k+1} = C_k - 2 eta_k <D theta_k, u_k> + eta_k^2 U_k with
    <D theta_k, u_k> from the module docstring. Inputs: U_k = <u_k, D u_k>, V_k = <D u_k, b> with b the momentum
    buffer after the step (b_k; in a momentum-0 step the untouched earlier buffer) (None = U_k, exact for heavy ball
    and for plain SGD before any buffer exists; Nesterov and momentum-0 steps after momentum steps need the measured
    V), B_k = <D theta_k, g_k> (None = symmetry only).
    State: `charge` = C_k; `overlap` = P_k = <D theta_k, b_{k-1}>; `started`: the group's momentum buffers exist.
    After a step, `last_du` holds that step's <D theta_k, u_k> (the angle of the step needs it: `theory/identity.py`).
    """

    last_du: Tensor | None = None

    def step(self, hp: Hyper, U: Tensor, V: Tensor | None = None, B: Tensor | None = None) -> Tensor:
        """Advance k -> k+1 and return the predicted C_{k+1} (tensor [G])."""
        C = self.charge
        r = hp.resolved(C)
        eta, lam = r.lr, r.weight_decay
        U = U.to(C.dtype)
        V = U if V is None else V.to(C.dtype)
        X = lam * C + _signed(r, B, C)  # <D theta_k, d_k>
        buffered, Q, du = self._buffer_rule(r, X)  # Q = <D theta_k, b_k>, du = <D theta_k, u_k>
        new = C - 2 * eta * du + eta * eta * U
        self.last_du = du
        # buffered: P_{k+1} = Q_k - eta V_k; momentum 0 with an old buffer: P_{k+1} = P_k - eta <D u_k, b_old>
        moved = torch.where(self.started, self.overlap - eta * V, self.overlap)
        self.overlap = torch.where(buffered, Q - eta * V, moved)
        self.started = self.started | buffered
        self.charge = new
        return new


class LinearRecurrence(_MomentumRecurrence):
    """Exact prediction of a translation charge T = <theta, 1_A> under torch.optim.SGD, for G groups.

    X_k = lambda T_k + B_k; M_k = <1_A, b_k> = X_k (first buffered step) | beta M_{k-1} + (1 - tau) X_k;
    T_{k+1} = T_k - eta_k (X_k | M_k | X_k + beta M_k). B_k = <1_A, g_k> (None = symmetry only).
    State: `charge` = T_k; `overlap` = M_{k-1} = <1_A, b_{k-1}> (constant between steps: 1_A does not move).
    """

    def step(self, hp: Hyper, B: Tensor | None = None) -> Tensor:
        """Advance k -> k+1 and return the predicted T_{k+1} (tensor [G])."""
        T = self.charge
        r = hp.resolved(T)
        eta, lam = r.lr, r.weight_decay
        X = lam * T + _signed(r, B, T)
        buffered, M, du = self._buffer_rule(r, X)
        new = T - eta * du
        self.overlap = torch.where(buffered, M, self.overlap)
        self.started = self.started | buffered
        self.charge = new
        return new


def plain_quadratic_step(charge: Tensor, lr: Tensor | float, weight_decay: Tensor | float, grad_sq: Tensor,
                         B: Tensor | None = None) -> Tensor:
    """Plain SGD (beta = 0): C_{k+1} = (1 - eta lambda)^2 C_k - 2 eta (1 - eta lambda) B_k + eta^2 <g_k, D g_k>.

    Follows from u = g + lambda theta and <d, D d> = <g, D g> + 2 lambda B + lambda^2 C.
    """
    a = 1 - lr * weight_decay
    out = a * a * charge + lr * lr * grad_sq
    if B is not None:
        out = out - 2 * lr * a * B
    return out


def plain_linear_step(charge: Tensor, lr: Tensor | float, weight_decay: Tensor | float,
                      B: Tensor | None = None) -> Tensor:
    """Plain SGD (beta = 0): T_{k+1} = (1 - eta lambda) T_k - eta B_k."""
    out = (1 - lr * weight_decay) * charge
    if B is not None:
        out = out - lr * B
    return out


def plain_sgd_charge(charge0: Tensor, lr: Tensor, weight_decay: Tensor | float, grad_sq: Tensor) -> Tensor:
    """Closed form after K plain-SGD steps of an exact symmetry (inputs lr, grad_sq of shape [K, G] or [K]):

        C_K = prod_k a_k^2 C_0 + sum_k eta_k^2 <g_k, D g_k> prod_{j > k} a_j^2,   a_k = 1 - eta_k lambda.

    The suffix products are formed by a reversed cumulative product (no division, no overflow).
    """
    lr = torch.as_tensor(lr, dtype=charge0.dtype)
    a2 = (1 - lr * weight_decay) ** 2
    a2 = a2.expand_as(grad_sq) if a2.shape != grad_sq.shape else a2
    suffix = torch.flip(torch.cumprod(torch.flip(a2, [0]), 0), [0])  # prod_{j >= k}
    after = torch.cat([suffix[1:], torch.ones_like(suffix[:1])], 0)  # prod_{j > k}
    lr_b = lr.expand_as(grad_sq) if lr.shape != grad_sq.shape else lr
    return suffix[0] * charge0 + (lr_b * lr_b * grad_sq * after).sum(0)
