"""torch.optim.SGD (and subclasses that keep SGD.step): exact, breaking and paper predictions, every step.

torch.optim.SGD does, per parameter (docs/theory.md section 5 notation):

    d = g + lambda theta,   b_k = beta b_{k-1} + (1 - tau) d  (b_0 = d),   u = d | b_k | d + beta b_k

and the recurrences (`theory/exact.py`) need per group B_k = <v, g_k> (v = D theta_k for quadratic charges, 1_A
for translation) and, for quadratic charges, U_k = <u, D u> and V_k = <D u, b_k>. The strategy measures as few
products as the recurrences allow:

* heavy ball: B_k at the pre hook, and U_k = V_k = velocity_sq = <b_k, D b_k> from torch's own updated buffer at
  the post hook: 2 products per tracked parameter (sharded parameters: the general algebra below instead, one
  product more but all at the pre hook, so one all_reduce per step instead of two);
* plain SGD, Nesterov, mixed: B_k, gg = <g, D g> and (with momentum) gb = <g, D b_{k-1}> at the pre hook; U, V
  follow by exact algebra on what the recurrence carries (`theory/sgd_measurements.py`): 2 or 3 products;
* translation groups: B_k = <1_A, g> (no product);
* log steps add the measured charge <theta, D theta> and the unsigned norms from the same cells.

Three predictions per group advance every step: `predicted_exact` (B = 0: what the symmetry alone implies),
`predicted_breaking` (fed the measured B_k: matches the measurement to float rounding) and `predicted_paper`
(the continuous model, `theory/continuous.py`). Everything stays on the device; nothing synchronises with the
host between log steps. Rows: `breaking` = predicted_breaking - predicted_exact, `breaking_term` = B_k,
`angular_update` = the angle between theta_k and theta_{k+1} (scale groups; `theory/identity.rotation_angle` with
a = 1 and the step's <D theta_k, u_k> from the recurrence) and, for scale groups under weight decay, the
equilibrium columns of `theory/equilibrium.py`: `predicted_equilibrium` = sqrt(S S_eq(g)) (S_eq from this step's
|g_A|^2), `angular_update_eq` = arccos(1 - eta lambda) (momentum: sqrt(2 eta lambda (1 - tau) / (1 + beta))) and
`relaxation_time` (the norm's e-fold time of the decay alone, 2 `relaxation_steps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from neural_mechanics.theory.applicability import applicability, equilibrium
from neural_mechanics.theory.continuous import PaperPrediction
from neural_mechanics.theory.equilibrium import (
    angular_update,
    relaxation_steps,
    scale_equilibrium_from_grad,
    scale_fixed_point,
)
from neural_mechanics.theory.exact import LinearRecurrence, QuadraticRecurrence
from neural_mechanics.theory.hyper import Hyper
from neural_mechanics.theory.identity import rotation_angle
from neural_mechanics.theory.sgd_measurements import update_products
from neural_mechanics.tracking.families import ChargeFamily
from neural_mechanics.tracking.metrics import prediction_column
from neural_mechanics.tracking.param_groups import ParamGroupIndex, Values
from neural_mechanics.tracking.products import Fields, Product
from neural_mechanics.tracking.rows import Row, base_row
from neural_mechanics.tracking.strategies.base import Applies, StepContext, Strategy, StrategySetup
from neural_mechanics.tracking.strategies.registry import register_strategy

__all__ = ["SGDStrategy"]

_GG = Product("gg", "grad", "grad")
_GB = Product("gb", "grad", "buffer")
_BB = Product("bb", "buffer", "buffer")


def _cpu(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in d.items()}


class _Charge:
    """One family under SGD: its three predictions, the carried <b, D b>, and the current step's inputs."""

    recurrence: ClassVar[type[QuadraticRecurrence] | type[LinearRecurrence]]

    def __init__(self, sgd: SGDStrategy, family: ChargeFamily, index: ParamGroupIndex):
        self.sgd, self.fam, self.index = sgd, family, index
        self.exact: Any = None
        self.breaking: Any = None
        self.paper: PaperPrediction | None = None
        self.vel: Tensor | None = None
        """<b_{k-1}, D b_{k-1}> per group (carried between steps; None = measure it when next needed)."""
        self.hp: Hyper | None = None
        self.B: Tensor | None = None
        self.pending: Row | None = None
        self.B_product = family.pairing("B", "grad")
        """B_k = <v, g_k>: <D theta_k, g_k> (quadratic) or <1_A, g_k> (linear)."""
        self.overlap_product = family.pairing("overlap", "buffer")
        """<v, b_{k-1}>, measured once when the tracker attaches to existing momentum buffers."""

    # ---- per step ------------------------------------------------------------------------------
    def measure(self, ctx: StepContext, measure: bool, log: bool) -> dict[str, Tensor]:
        """The products of (theta_k, g_k, b_{k-1}) this step needs, by name (B, C, norm2, gnorm2, overlap, ...)."""
        raise NotImplementedError

    def prepare(self, hp: Hyper, inp: dict[str, Tensor]) -> None:
        """Derive this step's remaining inputs from the measured ones (before the row and the advance)."""

    def advance(self, hp: Hyper, inp: dict[str, Tensor]) -> None:
        """Step the predictions k -> k+1 at the pre hook (when the pre hook has all inputs)."""
        raise NotImplementedError

    def set_mode(self, values: Values) -> None:
        """Choose how this step is measured (heavy ball or not), from the param groups' values."""

    def post(self, ctx: StepContext) -> None:
        """After torch's step (heavy ball measures here)."""

    def angular(self, row: Row, inp: Mapping[str, Tensor], hp: Hyper) -> None:
        """Fill angular_update once this step's U and <D theta_k, u_k> are known (after the recurrence stepped)."""

    def start(self, inp: Mapping[str, Tensor]) -> None:
        """Build the recurrences at the first step from the measured charge (and existing momentum buffers)."""
        C0 = inp["C"]
        flags = [self.sgd.buffer(s.members[0].param) is not None for s in self.fam.syms]
        started = _bools(flags, self.sgd.device)
        overlap0 = inp["overlap"] if any(flags) else None
        self.exact = self.recurrence(C0, overlap0=overlap0)
        self.breaking = self.recurrence(C0, overlap0=overlap0)
        for rec in (self.exact, self.breaking):
            rec.started = started.clone()
        self.paper = PaperPrediction(self.fam.quadratic, C0, prefactor=self.sgd.prefactor)  # type: ignore[arg-type]

    def row(self, inp: Mapping[str, Tensor], hp: Hyper | None, masks: Mapping[str, Tensor]) -> Row:
        """The log row at step k: measured, the three predictions at k (NaN where they do not apply), B_k."""
        fam = self.fam
        nan = fam.nan()
        lr = None if hp is None else torch.as_tensor(hp.lr, dtype=torch.float64, device=self.sgd.device)
        row = base_row(fam, inp["C"], inp["norm2"], inp.get("gnorm2"), lr, fam.valid & masks["exact"])
        assert self.paper is not None
        for kind, rec in (("exact", self.exact), ("breaking", self.breaking), ("paper", self.paper)):
            row[prediction_column(kind)] = torch.where(fam.valid & masks[kind], rec.charge, nan)
        row["breaking"] = row["predicted_breaking"] - row["predicted_exact"]
        row["breaking_term"] = inp["B"]
        if hp is not None and fam.quadratic and "gg" in inp:
            self.sgd.equilibrium_columns(self, row, inp, hp)
        return row


class _QuadraticCharge(_Charge):
    """Scale and rescale groups: QuadraticRecurrence, fed U, V, B; heavy ball measured after the step."""

    recurrence = QuadraticRecurrence

    def __init__(self, sgd: SGDStrategy, family: ChargeFamily, index: ParamGroupIndex):
        super().__init__(sgd, family, index)
        self.mode = "general"

    def set_mode(self, values: Values) -> None:
        """'heavy' when every param group of the family has momentum and no Nesterov (and the sums are not
        collectives: heavy ball measures at both hooks), else 'general'."""
        rows = [values[i] for i in self.index.pgs]
        m, n = self.sgd.key_index["momentum"], self.sgd.key_index["nesterov"]
        heavy = (not self.sgd.setup.collective and bool(rows)
                 and all(_num(r[m]) != 0 and not bool(_num(r[n])) for r in rows))
        self.mode = "heavy" if heavy else "general"

    def measure(self, ctx: StepContext, measure: bool, log: bool) -> dict[str, Tensor]:
        """Always B. Heavy ball measures U = V = <b_k, D b_k> at the post hook instead (2 products per step in all);
        otherwise gg and, with momentum, gb (3 products), the rest by algebra (`theory/sgd_measurements.py`).
        At log steps (and the first step) also C = <theta, D theta> (and |theta_A|^2, |g_A|^2 unsigned)."""
        fam, first = self.fam, self.exact is None
        heavy = self.mode == "heavy"
        # gb is needed with momentum, and in momentum-0 steps once buffers exist (they move P = <D theta, b_old>)
        mi = self.sgd.key_index["momentum"]
        momentum = any(_num(ctx.values[i][mi]) != 0 for i in self.index.pgs) or any(
            self.sgd.buffer(n) is not None for n in fam.table.params)
        need = [self.B_product]
        if log or not heavy:
            need.append(_GG)
        if measure:
            need.append(fam.charge)
        if not heavy and momentum:
            need.append(_GB)
        if first:
            need.append(self.overlap_product)
        if first or (not heavy and momentum and self.vel is None):
            need.append(_BB)
        if log:
            need += [fam.norm_sq, fam.grad_sq]
        out = ctx.reduce(fam, need, self.sgd.fields)
        if "bb" in out and (self.vel is None or first):
            self.vel = out["bb"]
        return out

    def prepare(self, hp: Hyper, inp: dict[str, Tensor]) -> None:
        """Plain SGD, Nesterov, mixed: U, V, grad_sq, velocity_sq from B, gg, gb and the breaking recurrence's C_k,
        P_k (before it steps) and the carried <b, D b>. Heavy ball: nothing (measured at the post hook)."""
        if self.mode == "heavy":
            return
        d = update_products(hp, B=inp["B"], gg=inp["gg"], gb=inp.get("gb"), charge=self.breaking.charge,
                            overlap=self.breaking.overlap, started=self.breaking.started, velocity=self.vel)
        inp.update(U=d.U, V=d.V, grad_sq=d.grad_sq, velocity_sq=d.velocity_sq)
        self.vel = d.velocity

    def advance(self, hp: Hyper, inp: dict[str, Tensor]) -> None:
        if self.mode != "heavy":  # heavy ball: at the post hook, with torch's updated buffer
            self._step(inp)

    def post(self, ctx: StepContext) -> None:
        """Heavy ball, after torch's step: U_k = V_k = velocity_sq = <b_k, D b_k> from the updated buffers."""
        if self.mode != "heavy":
            return
        assert self.B is not None and self.hp is not None
        bb = ctx.reduce(self.fam, [_BB], self.sgd.fields)["bb"]
        self.vel = bb
        self._step({"U": bb, "V": bb, "B": self.B, "velocity_sq": bb})
        if self.pending is not None:
            self.angular(self.pending, {"U": bb}, self.hp)

    def _step(self, inp: Mapping[str, Tensor]) -> None:
        hp = self.hp
        assert hp is not None and self.paper is not None
        self.exact.step(hp, inp["U"], inp["V"])
        self.breaking.step(hp, inp["U"], inp["V"], inp["B"])
        self.paper.step(hp, inp.get("grad_sq"), inp.get("velocity_sq"))

    def angular(self, row: Row, inp: Mapping[str, Tensor], hp: Hyper) -> None:
        """Scale groups: the angle between theta_k and theta_{k+1} = theta_k - eta u_k, from U_k and the recurrence's
        <D theta_k, u_k> of this step (`theory/identity.rotation_angle`, a = 1)."""
        du = self.breaking.last_du
        if "U" not in inp or du is None:
            return
        lr = torch.as_tensor(hp.lr, dtype=torch.float64, device=self.sgd.device).expand(self.fam.n)
        ang = rotation_angle(row["measured"], 1.0, lr, du, inp["U"])
        row["angular_update"] = torch.where(self.fam.is_scale, ang, torch.nan)


class _LinearCharge(_Charge):
    """Translation groups: LinearRecurrence, fed B = <1_A, g> only."""

    recurrence = LinearRecurrence

    def measure(self, ctx: StepContext, measure: bool, log: bool) -> dict[str, Tensor]:
        """B every step (+ T, sum |theta|, |g|^2 at log steps; <1_A, b_{-1}> at the first)."""
        fam = self.fam
        need = [self.B_product]
        if measure:
            need.append(fam.charge)
        if log:
            need += [fam.norm_sq, fam.grad_sq]
        if self.exact is None:
            need.append(self.overlap_product)
        return ctx.reduce(fam, need, self.sgd.fields)

    def advance(self, hp: Hyper, inp: dict[str, Tensor]) -> None:
        assert self.paper is not None
        self.exact.step(hp)
        self.breaking.step(hp, inp["B"])
        self.paper.step(hp)


def _num(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _bools(flags: list[bool], device: torch.device) -> Tensor:
    """bool [len(flags)] on `device`; all-equal flags (the usual case) without a host-to-device copy."""
    if all(flags) or not any(flags):
        return torch.full((len(flags),), bool(flags and flags[0]), dtype=torch.bool, device=device)
    return torch.tensor(flags, dtype=torch.bool, device=device)


@register_strategy(torch.optim.SGD)
class SGDStrategy(Strategy):
    """torch.optim.SGD: every step, three predictions per group (see the module docstring)."""

    name = "sgd"
    exact_theory = True
    memory_note = "no parameter copies (SGD)"

    @classmethod
    def accepts(cls, optimizer: torch.optim.Optimizer) -> bool:
        """SGD and subclasses that keep SGD.step (the update rule the recurrences mirror): asks the applicability."""
        return applicability(optimizer).exact.applies

    def __init__(self, setup: StrategySetup):
        super().__init__(setup)
        self.prefactor = setup.paper_prefactor
        self.key_index = {k: i for i, k in enumerate(self.hyper_keys)}
        self.charges: list[_Charge] = [
            (_QuadraticCharge if f.quadratic else _LinearCharge)(self, f, ix)
            for f, ix in zip(self.families, self.indexes, strict=True)]
        self.fields = Fields(self.params, {"buffer": self.buffer})

    def equilibrium_columns(self, ch: _Charge, row: Row, inp: Mapping[str, Tensor], hp: Hyper) -> None:
        """Scale groups under weight decay (`theory/applicability.equilibrium`): predicted_equilibrium,
        angular_update_eq and relaxation_time of `theory/equilibrium.py` (see the module docstring)."""
        fam = ch.fam
        on = fam.is_scale & fam.valid & (torch.tensor(
            [float(equilibrium(self.optimizer, self.optimizer.param_groups[i]).applies) for i in range(
                len(self.optimizer.param_groups))], dtype=torch.float64, device=self.device).index_select(
            0, ch.index.first) > 0.5)
        r = hp.resolved(row["measured"])
        s_inst = scale_equilibrium_from_grad(r.lr, r.weight_decay, inp["gg"], r.momentum, r.dampening)
        nan = fam.nan()
        row["predicted_equilibrium"] = torch.where(on, scale_fixed_point(row["measured"], s_inst), nan)
        row["angular_update_eq"] = torch.where(on, angular_update(r.lr, r.weight_decay, r.momentum, r.dampening)
                                               .expand(fam.n), nan)
        row["relaxation_time"] = torch.where(on, 2 * relaxation_steps(r.lr, r.weight_decay, r.momentum,
                                                                      r.dampening).expand(fam.n), nan)

    def buffer(self, name: str) -> Tensor | None:
        """torch's momentum buffer of parameter `name` (None before the first momentum step)."""
        buf = self.optimizer.state.get(self.params[name], {}).get("momentum_buffer")
        return buf if isinstance(buf, Tensor) else None

    def pre_step(self, ctx: StepContext, applies: Applies) -> None:
        inputs = []
        with ctx.batch():  # every family's sums first: one all_reduce for all when the parameters are sharded
            for ch, hp in zip(self.charges, ctx.hypers, strict=True):
                ch.hp = hp
                ch.set_mode(ctx.values)
                inputs.append(ch.measure(ctx, ctx.log or ch.exact is None, ctx.log))
        for ch, hp, masks, inp in zip(self.charges, ctx.hypers, applies.masks, inputs, strict=True):
            if ch.exact is None:
                ch.start(inp)
            ch.prepare(hp, inp)
            ch.B = inp.get("B")
            ch.pending = ch.row(inp, hp, masks) if ctx.log else None
            ch.advance(hp, inp)
            if ch.pending is not None and "U" in inp:  # heavy ball: at the post hook, after its step
                ch.angular(ch.pending, inp, hp)

    def post_step(self, ctx: StepContext, applies: Applies) -> list[Row | None] | None:
        for ch in self.charges:
            ch.post(ctx)
        if not ctx.log:
            return None
        rows = [ch.pending for ch in self.charges]
        for ch in self.charges:
            ch.pending = None
        return rows

    def log_rows(self, ctx: StepContext, applies: Applies) -> list[Row | None]:
        rows: list[Row | None] = []
        with ctx.batch():
            inputs = [ch.measure(ctx, True, True) for ch in self.charges]
        for ch, hp, masks, inp in zip(self.charges, ctx.hypers, applies.masks, inputs, strict=True):
            row = ch.row(inp, hp, masks)
            nan = ch.fam.nan()
            row["grad_norm"], row["breaking_term"], row["angular_update"] = nan, nan, nan
            rows.append(row)
        return rows

    def ready(self, step: int) -> bool:
        return all(ch.exact is not None for ch in self.charges)

    def family_state(self, i: int) -> dict[str, Any]:
        ch = self.charges[i]
        return {"exact": None if ch.exact is None else _cpu(ch.exact.state_dict()),
                "breaking": None if ch.breaking is None else _cpu(ch.breaking.state_dict()),
                "paper": None if ch.paper is None else _cpu(ch.paper.state_dict()),
                "vel": None if ch.vel is None else ch.vel.detach().cpu().clone()}

    def load_family_state(self, i: int, state: Mapping[str, Any]) -> None:
        ch = self.charges[i]
        vel = state.get("vel")
        ch.vel = None if vel is None else vel.to(device=self.device, dtype=torch.float64).clone()
        if state.get("exact") is None:
            ch.exact = ch.breaking = ch.paper = None
            return
        dummy = torch.zeros(ch.fam.n, dtype=torch.float64, device=self.device)
        ch.exact, ch.breaking = ch.recurrence(dummy), ch.recurrence(dummy)
        ch.paper = PaperPrediction(ch.fam.quadratic, dummy, prefactor=self.prefactor)  # type: ignore[arg-type]
        ch.exact.load_state_dict(state["exact"])
        ch.breaking.load_state_dict(state["breaking"])
        ch.paper.load_state_dict(state["paper"])
