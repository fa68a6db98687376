"""lion_pytorch.Lion (an optional extra, `pip install lion-pytorch`): the exact identity, the sign-update equilibrium.

lion-pytorch's step: theta <- (1 - eta lambda) theta (lambda / eta_0 with decoupled_weight_decay=True), then
theta <- theta - eta u_k with u_k = sign(beta1 m_{k-1} + (1 - beta1) g_k), and m_k = beta2 m_{k-1} + (1 - beta2) g_k.
u_k is formed at the pre hook from m_{k-1} and g_k with Lion's own operations (the same signs bit for bit), so
X_k = <D theta_k, u_k> is measured directly. |u_k|^2 = C exactly (no zero entries), so U_noise = C; the sign of a
Gaussian has correlated fraction 2 / pi (`theory/rotational.LION_RHO`) and Lion's filter is
c_0 = 1 - beta1, c_j = beta1 (1 - beta2) beta2^{j-1}. Not registered when lion-pytorch is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.theory.applicability import identity_rule
from neural_mechanics.theory.rotational import LION_RHO, MomentumFilter
from neural_mechanics.tracking.strategies.identity import IdentityStrategy
from neural_mechanics.tracking.strategies.registry import register_strategy

try:  # an optional dependency (the "optimizers" extra): without it there is no Lion to track
    from lion_pytorch import Lion
except ImportError:  # pragma: no cover - exercised only where lion-pytorch is missing
    Lion = None

__all__ = ["LionStrategy"]


class LionStrategy(IdentityStrategy):
    """Lion: u_k = sign(beta1 m_{k-1} + (1 - beta1) g_k) at the pre hook (see the module docstring)."""

    name = "lion"
    phase = "pre"
    hyper_keys = ("lr", "weight_decay", "betas")

    @classmethod
    def accepts(cls, optimizer: torch.optim.Optimizer) -> bool:
        return identity_rule(optimizer) == "lion"

    def update(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> Tensor | None:
        grad = param.grad
        if grad is None:
            return None
        beta1 = group["betas"][0]
        m = self.optimizer.state.get(param, {}).get("exp_avg")
        if m is None:  # Lion's first step starts from m = 0
            m = torch.zeros_like(param)
        return m.mul(beta1).add_(grad, alpha=1.0 - beta1).sgn_()   # in place after the first product

    def noise_unit(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        return 1.0

    def rho(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        return LION_RHO

    def momentum_filter(self, group: Mapping[str, Any]) -> MomentumFilter:
        beta1, beta2 = group["betas"]
        return MomentumFilter.lion(float(beta1), float(beta2))


if Lion is not None:
    register_strategy(Lion)(LionStrategy)
