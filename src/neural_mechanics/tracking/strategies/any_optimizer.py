"""Any torch.optim.Optimizer without its own strategy (Adagrad, NAdam, a subclass with its own step, unknown ones).

No prediction applies (`theory/applicability.py` says why: the update rule is unknown, or an adaptive
preconditioner the tracker cannot read), so every prediction is NaN and every row `valid=False`. What the strategy
measures instead, at log steps only, is the optimizer's own breaking of the law: with the update
u_k = (theta_k - theta_{k+1}) / eta_k read from the step itself (the a = 1 reading: any decay is inside u_k),

    breaking_term = <v, u_k>   (v = D theta_k for quadratic charges, 1_A for translation)
    angular_update = the angle between theta_k and theta_{k+1} (scale groups, `theory/identity.rotation_angle`)

For an unknown update rule this needs both theta_k and theta_{k+1}, so this is the one strategy that copies: every
tracked parameter at the pre hook of a log step (the memory of one extra model copy, only then), freed at the post
hook; between log steps it costs nothing. Known rules read u_k from the optimizer's state instead (`identity.py`).
The sums measured at the pre hook (charge, norms, |g|) are first read at the post hook, so they wait there
(`ctx.defer`) and join the post hook's sums: sharded, one all_reduce per log step and none in between.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neural_mechanics.theory.identity import rotation_angle
from neural_mechanics.tracking.products import Fields, Product
from neural_mechanics.tracking.rows import Row, base_row
from neural_mechanics.tracking.strategies.base import Applies, StepContext, Strategy, StrategySetup
from neural_mechanics.tracking.strategies.registry import register_strategy

__all__ = ["AnyOptimizerStrategy"]

_STEP_SQ = Product("step_sq", "delta", "delta", signed=False)


@register_strategy(torch.optim.Optimizer)
class AnyOptimizerStrategy(Strategy):
    """Measured charges and the optimizer's breaking term <v, u_k>; no predictions (see the module docstring)."""

    name = "any_optimizer"
    exact_theory = False
    memory_note = "one copy of every tracked parameter at log steps (optimizer term)"

    def __init__(self, setup: StrategySetup):
        super().__init__(setup)
        self._prev: dict[str, Tensor] = {}
        self._delta: dict[str, Tensor] = {}
        self._pending: list[dict[str, Tensor]] | None = None
        """The sums measured at a log step's pre hook (final once the post hook's batch has run)."""
        self._started = False
        self.fields = Fields(self.params, {"prev": self._prev.get, "delta": self._delta.get})

    def note(self) -> str:
        reason = self.verdict(self.optimizer.param_groups[0] if self.optimizer.param_groups else {}).exact.reason
        return (f"optimizer {type(self.optimizer).__name__} has no exact theory ({reason}); breaking_term holds "
                "the measured <D theta_k, u_k>, u_k = (theta_k - theta_{k+1}) / eta_k")

    def _measure(self, ctx: StepContext, with_grad: bool) -> list[dict[str, Tensor]]:
        """Per family the charge, its norm's sum and (with_grad) |g_A|^2, requested through ctx.reduce."""
        return [ctx.reduce(fam, [fam.charge, fam.norm_sq, *([fam.grad_sq] if with_grad else [])], self.fields)
                for fam in self.families]

    def _rows(self, ctx: StepContext, applies: Applies, sums: list[dict[str, Tensor]]) -> list[Row | None]:
        rows: list[Row | None] = []
        for fam, hp, masks, out in zip(self.families, ctx.hypers, applies.masks, sums, strict=True):
            lr = torch.as_tensor(hp.lr, dtype=torch.float64, device=self.device)
            rows.append(base_row(fam, out["C"], out["norm2"], out.get("gnorm2"), lr, fam.valid & masks["exact"]))
        return rows

    def pre_step(self, ctx: StepContext, applies: Applies) -> None:
        self._started = True
        if not ctx.log:
            return
        self._prev.clear()
        self._prev.update({name: p.detach().clone() for name, p in self.params.items()})
        with ctx.defer():  # read at the post hook: reduced together with the post hook's sums
            self._pending = self._measure(ctx, with_grad=True)

    def post_step(self, ctx: StepContext, applies: Applies) -> list[Row | None] | None:
        """At log steps, per group <v, u_k> with u_k = (theta_k - theta_{k+1}) / eta_k, and the angular update."""
        if not ctx.log or self._pending is None:
            return None
        outs = []
        with ctx.batch():  # also fills in the pre hook's deferred sums
            for fam in self.families:
                self._delta.update({name: self._prev[name] - self.params[name].detach()
                                    for name in fam.table.params})
                need = [fam.pairing("term", "delta", at="prev"), *([_STEP_SQ] if fam.quadratic else [])]
                outs.append(ctx.reduce(fam, need, self.fields))
        rows = self._rows(ctx, applies, self._pending)
        self._pending = None
        for fam, hp, row, out in zip(self.families, ctx.hypers, rows, outs, strict=True):
            assert row is not None
            lr = torch.as_tensor(hp.lr, dtype=torch.float64, device=self.device)
            eta = torch.where(lr != 0, lr, torch.full_like(lr, float("nan")))
            row["breaking_term"] = out["term"] / eta
            if fam.quadratic:  # the step delta = eta u_k itself: X = <theta_k, delta>, U = |delta|^2, "eta" = 1
                ang = rotation_angle(row["measured"], 1.0, 1.0, out["term"], out["step_sq"])
                row["angular_update"] = torch.where(fam.is_scale, ang, torch.nan)
        self._prev.clear()
        self._delta.clear()
        return rows

    def log_rows(self, ctx: StepContext, applies: Applies) -> list[Row | None]:
        with ctx.batch():
            sums = self._measure(ctx, with_grad=False)
        return self._rows(ctx, applies, sums)

    def ready(self, step: int) -> bool:
        return self._started or step > 0
