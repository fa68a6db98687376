"""torch.optim.SGD's update products per group, derived from the few a tracker measures (docs/theory.md section 5).

The exact quadratic recurrence (`exact.QuadraticRecurrence`) needs, per group and step, U_k = <u_k, D u_k> and
V_k = <D u_k, b> (b the momentum buffer after the step), and the paper's model (`continuous.PaperPrediction`) needs
grad_sq = <g_k, D g_k> and velocity_sq = <b_k, D b_k>. Measuring all of them costs a pass over every tracked
parameter each. Instead a tracker measures, before the step,

    B = <D theta_k, g_k>,   gg = <g_k, D g_k>,   gb = <g_k, D b_{k-1}>  (with momentum buffers only),

and everything else is exact algebra on quantities the breaking recurrence already carries: its charge C_k, its
overlap P_k = <D theta_k, b_{k-1}>, whether the buffers exist, and the previous bb = <b_{k-1}, D b_{k-1}>:

    s = -1 under maximize else 1;  dd = <d, D d> = gg + 2 lambda s B + lambda^2 C           (d = s g + lambda theta)
    e = <d, D b_{k-1}> = s gb + lambda P;   db = <d, D b_k> = beta e + (1 - tau) dd  (dd before any buffer)
    bb = <b_k, D b_k> = beta^2 bb_{k-1} + 2 beta (1 - tau) e + (1 - tau)^2 dd  (dd before any buffer)
    U = dd | bb | dd + 2 beta db + beta^2 bb,   V = dd | bb | db + beta bb   (plain | heavy ball | Nesterov)
    (momentum 0 with an old buffer b_old: V = <d, D b_old> = e, which moves P; U = dd; bb stays)

C_k and P_k of the breaking recurrence equal the measured ones to rounding, and they only enter multiplied by
lambda, so U and V are the measured ones to rounding. Heavy ball needs none of this: U = V = velocity_sq =
<b_k, D b_k> is one product of torch's own updated buffer after the step.

(The angle of a step, the measured `angular_update`, is `theory/identity.rotation_angle` with a = 1 and
X = <D theta_k, u_k> of the recurrence.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from neural_mechanics.theory.hyper import Hyper

__all__ = ["UpdateProducts", "update_products"]


class UpdateProducts(NamedTuple):
    """Per group (tensors [G]): what the recurrences and the paper's model read, plus the carried <b_k, D b_k>."""

    U: Tensor
    """<u_k, D u_k>."""
    V: Tensor
    """<D u_k, b> with b the buffer after the step (the untouched old buffer in a momentum-0 step)."""
    grad_sq: Tensor
    """<g_k, D g_k>."""
    velocity_sq: Tensor
    """<b_k, D b_k> (<d_k, D d_k> without momentum)."""
    velocity: Tensor
    """<b, D b> of the buffer torch holds after the step (unchanged by a momentum-0 step): carry it to the next."""


def update_products(hp: Hyper, *, B: Tensor, gg: Tensor, gb: Tensor | None, charge: Tensor, overlap: Tensor,
                    started: Tensor, velocity: Tensor | None) -> UpdateProducts:
    """U, V, grad_sq, velocity_sq of step k from the measured B, gg, gb (see the module docstring).

    charge = C_k, overlap = P_k and started (the group's buffers exist) come from the breaking recurrence's state
    before it steps; velocity = <b_{k-1}, D b_{k-1}> carried from the previous step (None = no buffer yet).
    """
    C, P = charge, overlap
    r = hp.resolved(C)
    beta, tau, lam = r.momentum, r.dampening, r.weight_decay
    s = torch.where(r.maximize, -1.0, 1.0).to(C.dtype)
    dd = gg + 2 * lam * s * B + lam * lam * C
    zero = torch.zeros_like(C)
    e = s * (zero if gb is None else gb) + lam * P
    vel = velocity if velocity is not None else zero
    db = torch.where(started, beta * e + (1 - tau) * dd, dd)
    bb = torch.where(started, beta * beta * vel + 2 * beta * (1 - tau) * e + (1 - tau) ** 2 * dd, dd)
    buffered = beta != 0
    nest = r.nesterov & buffered
    U = torch.where(buffered, torch.where(nest, dd + 2 * beta * db + beta * beta * bb, bb), dd)
    V = torch.where(buffered, torch.where(nest, db + beta * bb, bb), torch.where(started, e, dd))
    return UpdateProducts(U, V, gg, torch.where(buffered, bb, dd), torch.where(buffered, bb, vel))

