"""torch.optim.RMSprop (and subclasses keeping RMSprop.step): the exact identity with coupled L2 (a = 1).

torch's RMSprop step: d = g + lambda theta_k (g -> -g under maximize), v_k = alpha v_{k-1} + (1 - alpha) d^2,
avg = sqrt(v_k (- gbar_k^2 when centered)) + eps, then theta_{k+1} = theta_k - eta u_k with u_k = b_k (momentum:
b_k = mu b_{k-1} + d / avg) or u_k = d / avg. After the step the state holds v_k (gbar_k, b_k); without momentum
u_k still needs theta_k, which the step itself gives back per entry: theta_{k+1} = theta_k - eta (g + lambda theta_k)
/ avg, so u_k = (g + lambda theta_{k+1}) / (avg - eta lambda) (exact algebra). No equilibrium is predicted (coupled
L2 through the preconditioner, `theory/applicability.equilibrium`); `update_ratio` compares |u|^2 with its
noise-dominated value C / (1 - mu^2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.theory.applicability import identity_rule
from neural_mechanics.theory.rotational import MomentumFilter
from neural_mechanics.tracking.strategies.identity import IdentityStrategy
from neural_mechanics.tracking.strategies.registry import register_strategy

__all__ = ["RMSpropStrategy"]


@register_strategy(torch.optim.RMSprop)
class RMSpropStrategy(IdentityStrategy):
    """RMSprop: u_k from the state after the step (see the module docstring)."""

    name = "rmsprop"
    phase = "post"
    hyper_keys = ("lr", "weight_decay", "alpha", "eps", "momentum", "centered", "maximize")

    @classmethod
    def accepts(cls, optimizer: torch.optim.Optimizer) -> bool:
        return identity_rule(optimizer) == "rmsprop"

    def update(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> Tensor | None:
        st = self.optimizer.state.get(param)
        if not st or "square_avg" not in st or param.grad is None:
            return None
        if float(group["momentum"]) > 0:
            return st["momentum_buffer"]
        # one temporary per parameter, filled in place by the same float operations in the same order (the
        # allocations of a large matrix cost more than its arithmetic)
        sq = st["square_avg"]
        avg = (sq.addcmul(st["grad_avg"], st["grad_avg"], value=-1).sqrt_() if group["centered"] else sq.sqrt())
        avg.add_(float(group["eps"]))
        grad = param.grad
        lam = float(group["weight_decay"])
        if lam == 0:
            u = torch.div(grad, avg, out=avg)
            return u.neg_() if group["maximize"] else u   # (-g) / avg = -(g / avg) exactly
        num = param.detach() * lam
        num = num.sub_(grad) if group["maximize"] else num.add_(grad)   # g + lambda theta, g = -grad if maximize
        return num.div_(avg.sub_(float(group["lr"]) * lam))

    def noise_unit(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        return self.momentum_filter(group).f0

    def momentum_filter(self, group: Mapping[str, Any]) -> MomentumFilter:
        mu = float(group["momentum"])
        return MomentumFilter(1.0, mu, mu)
