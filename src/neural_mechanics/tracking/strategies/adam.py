"""torch.optim.Adam and AdamW (and subclasses keeping Adam.step): the exact identity, the rotational equilibrium.

torch's Adam step (`_single_tensor_adam`; foreach and fused compute the same): with coupled L2 the gradient gets
lambda theta_k added, with decoupled decay (AdamW) theta_k is first multiplied by a = 1 - eta lambda; then

    m_k = lerp(m_{k-1}, g, 1 - beta1),  v_k = beta2 v_{k-1} + (1 - beta2) g^2,  (amsgrad: v -> max of v so far)
    theta_{k+1} = a theta_k - eta u_k,   u_k = m_k / bc1 / (sqrt(v_k) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^k.

After the step the state holds m_k, v_k and the step count, so u_k is formed at the post hook (`identity.py`),
one parameter at a time. Equilibrium model (AdamW, docs/theory.md 6.3): the first moment is an EMA of
normalised gradients of unit variance per entry, so U_noise = C (1 - beta1) / (1 + beta1), r = beta1 / (1 - a beta1)
(bias corrections and eps neglected: late-time, noise-dominated regime; `update_ratio` < 1 says eps or a lagging
v_k shrinks the updates).
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

__all__ = ["AdamStrategy"]


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


@register_strategy(torch.optim.Adam)
class AdamStrategy(IdentityStrategy):
    """Adam / AdamW: u_k = m_hat / (sqrt(v_hat) + eps) from the state after the step (see the module docstring)."""

    name = "adam"
    phase = "post"
    hyper_keys = ("lr", "weight_decay", "betas", "eps", "amsgrad", "maximize", "decoupled_weight_decay")

    @classmethod
    def accepts(cls, optimizer: torch.optim.Optimizer) -> bool:
        return identity_rule(optimizer) == "adam"

    def update(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> Tensor | None:
        st = self.optimizer.state.get(param)
        if not st or "exp_avg" not in st:
            return None
        # the step count stays a tensor where Adam keeps one (on the device when capturable/fused): reading it as a
        # Python number would make the host wait for the device at every step
        step = st["step"].to(torch.float64) if isinstance(st["step"], Tensor) else float(st["step"])
        beta1, beta2 = (_num(b) for b in group["betas"])
        v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
        denom = v.sqrt().div_((1 - beta2 ** step) ** 0.5).add_(_num(group["eps"]))
        return torch.div(st["exp_avg"], denom, out=denom).div_(1 - beta1 ** step)   # in place: one temporary

    def noise_unit(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        return self.momentum_filter(group).f0

    def momentum_filter(self, group: Mapping[str, Any]) -> MomentumFilter:
        return MomentumFilter.ema(_num(group["betas"][0]))
