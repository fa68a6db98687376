"""The exact step identity for optimizers whose update the tracker reads from their state (docs/theory.md 6.1, 6.3).

Base of the strategies for Adam / AdamW (`adam.py`), RMSprop (`rmsprop.py`), Lion (`lion.py`) and Muon
(`muon.py`). A step is theta_{k+1} = a_k theta_k - eta_k u_k with a_k = 1 - eta_k lambda for decoupled decay (1 for
coupled L2, which sits inside u_k); per group, exactly (`theory/identity.py`),

    C_{k+1} = a^2 C_k - 2 eta a X_k + eta^2 U_k,   T_{k+1} = a T_k - eta Y_k,
    X_k = <D theta_k, u_k>,  U_k = <u_k, D u_k>,  Y_k = <1_A, u_k>.

How it is measured without copying the parameters: a subclass says how to form u_k of one parameter from the
optimizer's state (`update`) and when that is possible (`phase`):

* "post" (Adam, RMSprop, Muon): after the step the state holds what the step used (Adam's m_k, v_k; Muon's
  momentum buffer), so u_k is formed at the post hook next to theta_{k+1}, and
  X_k = (<D theta_{k+1}, u_k> + eta U_k) / a (since a theta_k = theta_{k+1} + eta u_k): 2 products per step;
* "pre" (Lion): u_k = sign(beta1 m_{k-1} + (1 - beta1) g_k) is formed from the state before the step, with the
  optimizer's own operations (so bit for bit the same signs), and X_k = <D theta_k, u_k> directly.

u_k lives one parameter at a time inside the reduction (`tracking/products.py`); nothing is kept between the
hooks but per-group scalars. `predicted_breaking` carries the identity from the measured C_0 (it matches the
measurement to float rounding exactly when the (a_k, u_k) read here is the step the optimizer took);
`predicted_exact` and `predicted_paper` do not apply (`theory/applicability.py`). At log steps the row also gets
the optimizer's term `breaking_term` = X_k (Y_k for translation), the measured `angular_update` (the angle between
theta_k and theta_{k+1}, `identity.rotation_angle`) and, for scale groups, the equilibrium columns
(`theory/rotational.py`): `predicted_equilibrium` = eta^2 U_noise (1 + 2 a r) / (1 - a^2), `angular_update_eq`,
`relaxation_time` = -1 / log a and `update_ratio` = U_k / U_noise, where U_noise is the update size of the
noise-dominated regime (`noise_unit` per entry) and r the cross ratio of the optimizer's momentum filter. The
instantaneous equilibrium from the measured update is predicted_equilibrium * update_ratio.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from neural_mechanics.theory.applicability import decoupled_decay, equilibrium
from neural_mechanics.theory.identity import IdentityPrediction, rotation_angle
from neural_mechanics.theory.rotational import (
    MomentumFilter,
    equilibrium_angle,
    equilibrium_charge,
    norm_relaxation_time,
)
from neural_mechanics.tracking.families import ChargeFamily
from neural_mechanics.tracking.metrics import prediction_column
from neural_mechanics.tracking.param_groups import ParamGroupIndex
from neural_mechanics.tracking.products import Fields, Product
from neural_mechanics.tracking.rows import Row, base_row
from neural_mechanics.tracking.strategies.base import Applies, StepContext, Strategy, StrategySetup

__all__ = ["IdentityStrategy"]

_U = Product("U", "update", "update")
_NOISE = Product("noise", "noise_unit", None, signed=False)
_RHO = Product("rho_noise", "rho_unit", None, signed=False)


class _Model:
    """Per group (tensors [G]): the noise-regime update size and the momentum filter of the equilibrium model."""

    def __init__(self, noise: Tensor, rho: Tensor, p: Tensor, q: Tensor, beta: Tensor, applies: Tensor):
        self.noise, self.rho, self.applies = noise, rho, applies
        self.f0 = p * p + q * q / (1 - beta * beta)
        self.num = p * q + q * q * beta / (1 - beta * beta)
        self.beta = beta

    def ratio(self, a: Tensor) -> Tensor:
        """r = rho F1(a) / F0 (`theory/rotational.cross_ratio`, vectorised over groups with their own filters)."""
        return self.rho * self.num / (1 - a * self.beta) / self.f0


class _Family:
    """One family's carried prediction and the pending row of a log step."""

    def __init__(self, family: ChargeFamily, index: ParamGroupIndex):
        self.fam, self.index = family, index
        self.pred: IdentityPrediction | None = None
        self.pending: Row | None = None
        self.charge: Tensor | None = None
        """The measured C_k of a log step (the angle's denominator)."""
        self.tables: dict[str, tuple[tuple[float, ...], Tensor]] = {}
        """Per-group tables of param-group values, by what they hold: (the values, the table), rebuilt only when
        the values change (a tensor made from Python numbers is a host-to-device copy on a GPU); one entry per
        quantity, so a scheduled value does not pile up tables."""
        self.model: _Model | None = None


class IdentityStrategy(Strategy):
    """The identity of docs/theory.md section 6.1 every step, equilibria at log steps (see the module docstring)."""

    exact_theory = True
    phase: ClassVar[str] = "post"
    """When `update` can be formed: "pre" (from the state before the step) or "post" (after it)."""
    memory_note = "no parameter copies: u_k is formed from the optimizer's state one parameter at a time"

    def __init__(self, setup: StrategySetup):
        super().__init__(setup)
        self.charges = [_Family(f, ix) for f, ix in zip(self.families, self.indexes, strict=True)]
        by_id = {id(p): pg for pg in self.optimizer.param_groups for p in pg["params"]}
        self.group_of: dict[str, Mapping[str, Any] | None] = {n: by_id.get(id(p)) for n, p in self.params.items()}
        """Member parameter name -> its param group (None: not in the optimizer)."""
        self.fields = Fields(self.params, {"update": self._update, "noise_unit": self._noise_unit,
                                           "rho_unit": self._rho_unit})
        self._requested: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor] | None]] = []
        """Per family, the pre hook's sums (and the model's, at the first step) until they are used."""

    # ---- what a subclass says -------------------------------------------------------------------------
    def update(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> Tensor | None:
        """u_k of one parameter at `phase` (None: the optimizer did not touch it)."""
        raise NotImplementedError

    def noise_unit(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        """E u_i^2 per entry in the noise-dominated regime (gradients of zero mean, uncorrelated across steps)."""
        raise NotImplementedError

    def rho(self, name: str, param: nn.Parameter, group: Mapping[str, Any]) -> float:
        """The correlated fraction of the update's nonlinearity (`theory/rotational.py`): 1 for a linear map."""
        return 1.0

    def momentum_filter(self, group: Mapping[str, Any]) -> MomentumFilter:
        """The linear filter of the gradients the update is formed from."""
        raise NotImplementedError

    # ---- fields -----------------------------------------------------------------------------------------
    def _update(self, name: str) -> Tensor | None:
        group, p = self.group_of[name], self.params[name]
        if group is None or p.grad is None:
            return None
        return self.update(name, p, group)

    def _constant(self, name: str, value: float) -> Tensor:
        return torch.full_like(self.params[name].detach(), value)

    def _noise_unit(self, name: str) -> Tensor | None:
        group = self.group_of[name]
        return None if group is None else self._constant(name, self.noise_unit(name, self.params[name], group))

    def _rho_unit(self, name: str) -> Tensor | None:
        group, p = self.group_of[name], self.params[name]
        if group is None:
            return None
        return self._constant(name, self.rho(name, p, group) * self.noise_unit(name, p, group))

    # ---- per-group values -------------------------------------------------------------------------------
    def _per_group(self, ch: _Family, what: str, values: list[float]) -> Tensor:
        """values[i] of param group i, for each group of the family (`what` names the quantity; its table is kept
        until its values change)."""
        key = tuple(values)
        cached = ch.tables.get(what)
        if cached is not None and cached[0] == key:
            return cached[1]
        table = torch.tensor(values, dtype=torch.float64, device=self.device).index_select(0, ch.index.first)
        ch.tables[what] = (key, table)
        return table

    def _decay(self, ch: _Family) -> Tensor:
        return self._per_group(ch, "decay", [decoupled_decay(self.optimizer, pg) for pg in self.optimizer.param_groups])

    def _build_model(self, ch: _Family, out: Mapping[str, Tensor]) -> _Model:
        """The equilibrium model of every group, from the param groups at its first step (betas, shapes) and the
        sums `out` of the _NOISE and _RHO products."""
        filters = [self.momentum_filter(pg) for pg in self.optimizer.param_groups]
        verdicts = [equilibrium(self.optimizer, pg).applies for pg in self.optimizer.param_groups]
        rho = out["rho_noise"] / out["noise"].clamp_min(1e-300)
        applies = self._per_group(ch, "applies", [float(v) for v in verdicts]) > 0.5
        return _Model(out["noise"], rho, self._per_group(ch, "p", [f.p for f in filters]),
                      self._per_group(ch, "q", [f.q for f in filters]),
                      self._per_group(ch, "beta", [f.beta for f in filters]), applies & ch.fam.is_scale)

    # ---- hooks ----------------------------------------------------------------------------------------
    def _products(self, fam: ChargeFamily) -> list[Product]:
        return [fam.pairing("X", "update"), *([_U] if fam.quadratic else [])]

    def pre_step(self, ctx: StepContext, applies: Applies) -> None:
        """Request the pre-hook sums of every family in one bracket: `ctx.batch()` when they are read now (phase
        "pre"), `ctx.defer()` when they are first read at the post hook (phase "post"); sharded, that is one
        all_reduce per step in both cases (`strategies/base.py`)."""
        requested: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor] | None]] = []
        with ctx.batch() if self.phase == "pre" else ctx.defer():
            for ch in self.charges:
                fam, first = ch.fam, ch.pred is None
                need: list[Product] = []
                if first or ctx.log:
                    need.append(fam.charge)
                if ctx.log:
                    need += [fam.norm_sq, fam.grad_sq]
                if self.phase == "pre":
                    need += self._products(fam)
                out = ctx.reduce(fam, need, self.fields) if need else {}
                model = ctx.reduce(fam, [_NOISE, _RHO], self.fields) if ch.model is None else None
                requested.append((out, model))
        self._requested = requested
        if self.phase == "pre":
            self._take_pre(ctx, applies)

    def _take_pre(self, ctx: StepContext, applies: Applies) -> None:
        """Use the pre-hook sums (final now): start the prediction, build the model, the log step's row."""
        for ch, hp, masks, (out, model) in zip(self.charges, ctx.hypers, applies.masks, self._requested, strict=True):
            if ch.pred is None:
                ch.pred = IdentityPrediction(out["C"], ch.fam.quadratic)
            if model is not None:
                ch.model = self._build_model(ch, model)
            ch.pending = self._row(ch, out, hp.lr, masks) if ctx.log else None
            ch.charge = out.get("C")
            if self.phase == "pre":
                self._advance(ch, hp.lr, out["X"], out.get("U"))

    def post_step(self, ctx: StepContext, applies: Applies) -> list[Row | None] | None:
        if self.phase == "post":
            with ctx.batch():  # the post sums, and with them the deferred pre sums: one collective when sharded
                posts = [ctx.reduce(ch.fam, self._products(ch.fam), self.fields) for ch in self.charges]
            self._take_pre(ctx, applies)
            for ch, hp, out in zip(self.charges, ctx.hypers, posts, strict=True):
                X, U = out["X"], out.get("U")
                if U is not None:  # quadratic: <D theta_k, u> from <D theta_{k+1}, u>, a theta_k = theta_{k+1} + eta u
                    lr = torch.as_tensor(hp.lr, dtype=torch.float64, device=self.device)
                    X = (X + lr * U) / self._decay_factor(ch, hp.lr)
                self._advance(ch, hp.lr, X, U)
        self._requested = []
        if not ctx.log:
            return None
        rows: list[Row | None] = [ch.pending for ch in self.charges]
        for ch in self.charges:
            ch.pending = None
        return rows

    def _decay_factor(self, ch: _Family, lr: Any) -> Tensor:
        return 1 - torch.as_tensor(lr, dtype=torch.float64, device=self.device) * self._decay(ch)

    def _row(self, ch: _Family, out: Mapping[str, Tensor], lr: Any, masks: Mapping[str, Tensor]) -> Row:
        fam = ch.fam
        assert ch.pred is not None
        lr_t = None if lr is None else torch.as_tensor(lr, dtype=torch.float64, device=self.device)
        ok = fam.valid & masks["breaking"]
        row = base_row(fam, out["C"], out["norm2"], out.get("gnorm2"), lr_t, ok)
        row[prediction_column("breaking")] = torch.where(ok, ch.pred.charge, fam.nan())
        return row

    def _advance(self, ch: _Family, lr: Any, X: Tensor, U: Tensor | None) -> None:
        """Fill the pending row's step columns (X, angle, equilibrium), then step the prediction k -> k+1."""
        assert ch.pred is not None and ch.model is not None
        lr_t = torch.as_tensor(lr, dtype=torch.float64, device=self.device).expand(ch.fam.n)
        a = self._decay_factor(ch, lr)
        row = ch.pending
        if row is not None:
            row["breaking_term"] = X
            if ch.fam.quadratic and U is not None and ch.charge is not None:
                self._equilibrium_columns(ch, row, lr_t, a, X, U, ch.charge)
        ch.pred.step(a, lr_t, X, U)

    def _equilibrium_columns(self, ch: _Family, row: Row, lr: Tensor, a: Tensor, X: Tensor, U: Tensor,
                             C: Tensor) -> None:
        fam, m = ch.fam, ch.model
        assert m is not None
        nan = fam.nan()
        row["angular_update"] = torch.where(fam.is_scale, rotation_angle(C, a, lr, X, U), nan)
        on = m.applies & fam.valid
        r = m.ratio(a)
        row["predicted_equilibrium"] = torch.where(on, equilibrium_charge(lr, a, m.noise, r), nan)
        row["angular_update_eq"] = torch.where(on, equilibrium_angle(a, r), nan)
        row["relaxation_time"] = torch.where(on, norm_relaxation_time(a), nan)
        row["update_ratio"] = torch.where(fam.is_scale & fam.valid, U / m.noise.clamp_min(1e-300), nan)

    # ---- outside a step, checkpoints ------------------------------------------------------------------
    def log_rows(self, ctx: StepContext, applies: Applies) -> list[Row | None]:
        rows: list[Row | None] = []
        for ch, masks in zip(self.charges, applies.masks, strict=True):
            out = ctx.reduce(ch.fam, [ch.fam.charge, ch.fam.norm_sq], self.fields)
            rows.append(self._row(ch, out, None, masks))
        return rows

    def ready(self, step: int) -> bool:
        return all(ch.pred is not None for ch in self.charges)

    def family_state(self, i: int) -> dict[str, Any]:
        pred = self.charges[i].pred
        return {**super().family_state(i), "identity": None if pred is None else pred.state_dict()}

    def load_family_state(self, i: int, state: Mapping[str, Any]) -> None:
        ch = self.charges[i]
        saved = state.get("identity")
        if saved is None:
            ch.pred = None
            return
        ch.pred = IdentityPrediction(torch.zeros(ch.fam.n, dtype=torch.float64, device=self.device), ch.fam.quadratic)
        ch.pred.load_state_dict(saved, self.device)

    def note(self) -> str:
        return ""
