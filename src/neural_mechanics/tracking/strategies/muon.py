"""torch.optim.Muon: the exact identity, and the equilibrium of orthogonalised matrix updates.

torch's Muon step (`torch/optim/_muon.py`) per 2-D parameter: B_k = lerp(B_{k-1}, g_k, 1 - mu), z_k = lerp(g_k, B_k,
mu) (Nesterov) or B_k, O_k = NS(z_k) (a bfloat16 Newton-Schulz iteration towards the orthogonal polar factor), then
theta <- (1 - eta lambda) theta - eta s O_k with s = adjusted_lr / lr (`adjust_lr_fn`, by the matrix's shape). So
u_k = s O_k, formed at the post hook from B_k and g_k by the same functions of the same torch build (the update must
be reproduced bit for bit; a torch without them makes this strategy decline and the run is only measured).
Recomputing O_k costs one Newton-Schulz per tracked matrix per step, about the optimizer's own work, so the
strategy first keeps the O_k the step itself computed (`muon_capture.NewtonSchulzCapture`: the same tensors, no
recomputation) and recomputes only when that capture does not match the step (another torch build, say).

Which groups fit: Muon acts on whole matrices, so a whole-matrix scale group (a weight followed by a LayerNorm
without affine, say) is the natural one: |u|^2 = s^2 |O|^2 is fixed by the spectrum. A row group (a weight row
followed by BatchNorm) is updated by row c of O; for a wide matrix (rows <= columns) the rows of the polar factor
are orthonormal, so |u_c|^2 = s^2 as well, and for a tall one the row norms vary around s^2 columns / rows. The
identity holds for every group; the equilibrium model (U_noise = s^2 E|O|^2 per entry and the correlated fraction
rho of Newton-Schulz on a Gaussian matrix of the parameter's shape, `theory/rotational.orthogonalized_statistics`,
sampled once per shape) treats rows as exchangeable, which holds on average over the rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.theory.applicability import identity_rule
from neural_mechanics.theory.rotational import MomentumFilter, orthogonalized_statistics
from neural_mechanics.tracking.rows import Row
from neural_mechanics.tracking.strategies.base import Applies, StepContext, StrategySetup
from neural_mechanics.tracking.strategies.identity import IdentityStrategy
from neural_mechanics.tracking.strategies.muon_capture import NewtonSchulzCapture
from neural_mechanics.tracking.strategies.registry import register_strategy

__all__ = ["MuonStrategy"]

try:  # the functions torch's own Muon step calls (private: present exactly when torch ships Muon)
    _MUON: Any = importlib.import_module("torch.optim._muon")
    _NS: Callable[..., Tensor] | None = _MUON._zeropower_via_newtonschulz
    _ADJUST: Callable[..., float] | None = _MUON._adjust_lr
except (ImportError, AttributeError):  # pragma: no cover - a torch without Muon
    _NS = _ADJUST = None


@lru_cache(maxsize=64)
def _statistics(shape: tuple[int, int], coefficients: tuple[float, float, float], steps: int,
                eps: float) -> tuple[float, float]:
    """(rho, E|O|^2 per entry) of torch's Newton-Schulz on Gaussian matrices of `shape` (seeded, cached)."""
    assert _NS is not None
    return orthogonalized_statistics(shape, lambda z: _NS(z, coefficients, steps, eps))


class MuonStrategy(IdentityStrategy):
    """Muon: u_k = (adjusted_lr / lr) NS(z_k) from the momentum buffer after the step (see the module docstring)."""

    name = "muon"
    phase = "post"
    hyper_keys = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn")
    memory_note = ("no parameter copies: u_k is the Newton-Schulz output of Muon's own step, held from the step to "
                   "the post hook (bfloat16, half a float32 copy of the tracked matrices); recomputed from the "
                   "momentum buffer one matrix at a time when it cannot be read")

    def __init__(self, setup: StrategySetup):
        super().__init__(setup)
        self.capture = NewtonSchulzCapture(self.optimizer, self.params.values())
        self._outputs: dict[int, Tensor] = {}
        """id(param) -> O_k of this step, between the post hook's start and its end."""

    def pre_step(self, ctx: StepContext, applies: Applies) -> None:
        super().pre_step(ctx, applies)
        self.capture.start()

    def post_step(self, ctx: StepContext, applies: Applies) -> list[Row | None] | None:
        self._outputs = self.capture.finish()
        try:
            return super().post_step(ctx, applies)
        finally:
            self._outputs = {}

    def close(self) -> None:
        self.capture.discard()

    @classmethod
    def accepts(cls, optimizer: torch.optim.Optimizer) -> bool:
        return _NS is not None and identity_rule(optimizer) == "muon"

    @staticmethod
    def _scale(group: Mapping[str, Any], shape: torch.Size) -> float:
        assert _ADJUST is not None
        return float(_ADJUST(1.0, group["adjust_lr_fn"], shape))

    def update(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> Tensor | None:
        buf = self.optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is None or param.grad is None:
            return None
        o = self._outputs.get(id(param))
        if o is None:  # not captured: recompute it from the state, with the step's own functions
            assert _NS is not None
            z = param.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            o = _NS(z, group["ns_coefficients"], group["ns_steps"], group["eps"])
        return o.to(param.dtype).mul_(self._scale(group, param.shape))

    def _stats(self, param: nn.Parameter, group: Mapping[str, Any]) -> tuple[float, float]:
        return _statistics(tuple(param.shape), tuple(group["ns_coefficients"]), int(group["ns_steps"]),
                           float(group["eps"]))

    def noise_unit(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        return self._scale(group, param.shape) ** 2 * self._stats(param, group)[1]

    def rho(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        return self._stats(param, group)[0]

    def momentum_filter(self, group: Mapping[str, Any]) -> MomentumFilter:
        mu = float(group["momentum"])
        return MomentumFilter.nesterov_ema(mu) if group["nesterov"] else MomentumFilter.ema(mu)


if hasattr(torch.optim, "Muon"):
    register_strategy(torch.optim.Muon)(MuonStrategy)
