"""The exact step identity of any optimizer, and the rotation angle of a step (docs/theory.md section 6.1).

Write one optimizer step as theta_{k+1} = a_k theta_k - eta_k u_k: decoupled weight decay (AdamW, Lion, Muon)
has a_k = 1 - eta_k lambda and u_k the optimizer's own direction; coupled decay (SGD, Adam(weight_decay=),
RMSprop) has a_k = 1 with the decay inside u_k. Then, per group, by plain algebra (so to float rounding),

    C_{k+1} = a_k^2 C_k - 2 eta_k a_k X_k + eta_k^2 U_k       X_k = <D theta_k, u_k>,  U_k = <u_k, D u_k>
    T_{k+1} = a_k T_k - eta_k Y_k                              Y_k = <1_A, u_k>

(C = <theta, D theta>: scale and rescale; T = <1_A, theta>: translation). X_k is the optimizer's breaking of
the conservation law (zero for plain SGD on an exact symmetry in the decoupled reading, not for Adam's
preconditioned steps). `IdentityPrediction` carries C or T from the measured C_0 with the measured X, U, Y of
every step: the prediction equals the measured charge to float rounding exactly when the update rule
(a_k, u_k) read from the optimizer is the one it applied, which is what makes it a check.

The angle of a step (scale groups, D = 1 on A): theta_{k+1} = (a - eta X / S) theta_k - eta u_perp with
|u_perp|^2 = U - X^2 / S, so

    angle(theta_k, theta_{k+1}) = atan2(eta |u_perp|, a |theta_k| - eta X / |theta_k|)

from per-group scalars only. This is the one definition of `angular_update` (measured) and of the
equilibrium predictions it is compared with (`theory/rotational.py`, `theory/equilibrium.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TINY", "IdentityPrediction", "rotation_angle"]

TINY = 1e-30
"""Floor of a charge in a denominator (a dead group's |theta_A|^2 may be exactly 0)."""


def rotation_angle(charge: Tensor, a: Tensor | float, lr: Tensor | float, X: Tensor, U: Tensor) -> Tensor:
    """Angle (radians) between theta_k and theta_{k+1} = a theta_k - eta u of a scale group (see the module docstring).

    charge = S_k = |theta_k|^2, X = <theta_k, u_k>, U = |u_k|^2 (float64 tensors [G]); 0 for a group of norm 0.
    """
    S = charge.abs().clamp_min(TINY)
    norm = torch.sqrt(S)
    perp = torch.sqrt((U - X * X / S).clamp_min(0.0))
    return torch.atan2(lr * perp, a * norm - lr * X / norm)


class IdentityPrediction:
    """C_k (quadratic groups) or T_k (linear groups) carried by the exact identity from the measured start value.

    `step(a, lr, X, U)` for quadratic charges, `step(a, lr, Y)` for linear ones (U None); tensors [G] or scalars.
    """

    def __init__(self, charge0: Tensor, quadratic: bool):
        self.charge: Tensor = charge0.to(torch.float64).clone()
        self.quadratic = quadratic

    def step(self, a: Tensor, lr: Tensor, X: Tensor, U: Tensor | None = None) -> Tensor:
        """Advance k -> k+1 and return the prediction of the charge at k+1."""
        if self.quadratic:
            if U is None:
                raise ValueError("a quadratic charge needs U = <u, D u>")
            self.charge = a * a * self.charge - 2 * lr * a * X + lr * lr * U
        else:
            self.charge = a * self.charge - lr * X
        return self.charge

    def state_dict(self) -> dict[str, Any]:
        return {"charge": self.charge.detach().cpu().clone(), "quadratic": self.quadratic}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.charge = state["charge"].to(device=device, dtype=torch.float64).clone()
        self.quadratic = bool(state["quadratic"])
