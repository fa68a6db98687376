"""What an optimizer strategy is: the per-step measurements, recurrences and predictions of one optimizer family.

The tracker owns the hooks, the groups and their validity, the hyperparameters and the sink; a strategy owns what
depends on the optimizer's update rule. Per optimizer step the tracker calls

    pre_step(ctx)    at the step pre hook: theta_k and g_k are there (the update is not); advance the predictions
    post_step(ctx)   at the step post hook: theta_{k+1} and the optimizer's new state are there; return the rows of
                     a log step (one per family, column name -> float64 tensor [G], see `tracking/rows.py`)

and `log_rows(ctx)` outside a step (the final row). Measurements are declared as `Product` records and reduced
through `ctx.reduce`, the tracker's one reduction function. Which predictions apply is decided by `verdict`, i.e.
by `theory/applicability.py`; the tracker keeps the result per group (`Applies`) and the strategy masks its
predictions with it.

Sharded models (FSDP2): `ctx.reduce` then forms per-rank partial sums and adds them over ranks with an all_reduce
(`tracking/collective_sums.py`); every strategy is correct as it is, one collective per `ctx.reduce` call. To
need one collective per step, a strategy requests what it needs before reading any of it: every family's sums
inside `with ctx.batch():` (filled in at exit), and sums measured at the pre hook but first read at the post hook
inside `with ctx.defer():` (filled in by the post hook's batch). On one process both brackets do nothing.
`setup.collective` says whether sums cross ranks (a strategy may then prefer measuring at one hook over fewer
products: the SGD strategy's heavy-ball mode measures at both hooks, its general algebra at the pre hook only).

A strategy is registered for an optimizer class (`registry.register_strategy`); adding one is one module.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from neural_mechanics.theory.applicability import PREDICTION_KINDS, Applicability, applicability, equilibrium
from neural_mechanics.theory.hyper import Hyper
from neural_mechanics.tracking.families import ChargeFamily
from neural_mechanics.tracking.metrics import prediction_column
from neural_mechanics.tracking.param_groups import HYPER_KEYS, ParamGroupIndex, Values
from neural_mechanics.tracking.products import Fields, Product
from neural_mechanics.tracking.rows import Row

__all__ = ["Applies", "Reduce", "StepContext", "Strategy", "StrategySetup"]

Reduce = Callable[[ChargeFamily, Sequence[Product], Fields], dict[str, Tensor]]
"""The one reduction function: (family, products, fields) -> {product name: float64 tensor [G]}."""


@dataclass
class StepContext:
    """What a strategy sees at a hook."""

    step: int
    """k: the index of the step being taken (or, outside a step, of the state being logged)."""
    log: bool
    """Whether this step's rows are logged (only then the strategy measures log-only quantities)."""
    values: Values
    """Per param group, the values of the strategy's `hyper_keys` now."""
    hypers: list[Hyper]
    """Per family, the hyperparameters of each group (tensors [G])."""
    reduce: Reduce
    batch: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    """`with ctx.batch():` sums requested inside are final at exit (one all_reduce for all when sharded)."""
    defer: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    """`with ctx.defer():` sums requested inside are final after the next reduce or batch (or the step's end)."""


@dataclass
class StrategySetup:
    """What a strategy is built from (by the tracker)."""

    optimizer: torch.optim.Optimizer
    params: Mapping[str, nn.Parameter]
    """Member parameter name -> parameter."""
    families: Sequence[ChargeFamily]
    indexes: Sequence[ParamGroupIndex]
    """Per family, where its groups sit in the param groups."""
    device: torch.device
    paper_prefactor: str = "derived"
    collective: bool = False
    """Whether sums are added over ranks (sharded parameters): each reduce outside a bracket is a collective."""


class Applies:
    """Per family and prediction kind ("exact", "breaking", "paper"), a bool [G]: the prediction applies to the group.

    Sticky: once a prediction stops applying to a group (its state has left the theory), it stays off. `summary`
    is the run-level view the manifest keeps: per prediction column, whether it applies to every param group
    and why (the first reason it stopped, if it did).
    """

    def __init__(self, families: Sequence[ChargeFamily], indexes: Sequence[ParamGroupIndex]):
        self.families, self.indexes = list(families), list(indexes)
        self.masks: list[dict[str, Tensor]] = [
            {k: torch.ones(f.n, dtype=torch.bool, device=f.device) for k in PREDICTION_KINDS} for f in self.families]
        self.summary: dict[str, dict[str, Any]] = {}
        self._cleared: dict[str, set[int]] = {k: set() for k in PREDICTION_KINDS}
        """Param groups whose groups are already masked off, per kind (the masks are sticky)."""

    def update(self, verdicts: Sequence[Applicability]) -> bool:
        """Apply the verdicts of every param group (`Strategy.verdict`); True when the summary changed."""
        tracked = sorted({i for ix in self.indexes for i in ix.pgs})
        changed = False
        for kind in PREDICTION_KINDS:
            col = prediction_column(kind)
            failing = [(i, getattr(verdicts[i], kind)) for i in tracked if not getattr(verdicts[i], kind).applies]
            bad = {i for i, _ in failing} - self._cleared[kind]
            if bad:
                self._cleared[kind] |= bad
                for fam, ix, masks in zip(self.families, self.indexes, self.masks, strict=True):
                    gids = [g for g, st in enumerate(ix.sets) if bad.intersection(st)]
                    if gids:
                        masks[kind].index_fill_(0, torch.tensor(gids, dtype=torch.long, device=fam.device), False)
            old = self.summary.get(col)
            if old is not None and not old["applies"]:
                continue  # sticky: keep the first reason
            if failing:
                reasons = list(dict.fromkeys(v.reason for _, v in failing))
                new = {"applies": False, "reason": "; ".join(reasons),
                       "param_groups": [i for i, _ in failing]}
            else:
                first = tracked[0] if tracked else None
                new = {"applies": True, "reason": getattr(verdicts[first], kind).reason if first is not None else ""}
            if new != old:
                self.summary[col] = new
                changed = True
        return changed

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A copy of `summary` (for the manifest and checkpoints)."""
        return {col: dict(v) for col, v in self.summary.items()}

    def restore(self, summary: Mapping[str, Mapping[str, Any]] | None) -> None:
        """Resume `summary` from a checkpoint (None: keep the current decision)."""
        if summary is not None:
            self.summary = {str(col): dict(v) for col, v in summary.items()}

    def state(self, i: int) -> dict[str, Tensor]:
        return {k: m.cpu().clone() for k, m in self.masks[i].items()}

    def load_state(self, i: int, state: Mapping[str, Tensor] | None) -> None:
        """Restore a family's masks (a checkpoint without them: all apply until the next decision)."""
        if state is not None:
            self.masks[i] = {k: state[k].to(self.families[i].device).clone() for k in PREDICTION_KINDS}


class Strategy(ABC):
    """The update-rule-specific half of the tracker, for one optimizer (see the module docstring)."""

    name: ClassVar[str]
    exact_theory: ClassVar[bool]
    """True when the strategy predicts the charges (False: it only measures)."""
    hyper_keys: ClassVar[tuple[str, ...]] = HYPER_KEYS
    """The param-group hyperparameters that must agree across a group's param groups."""
    memory_note: ClassVar[str]
    """What the strategy costs in memory, for the run's manifest."""

    def __init__(self, setup: StrategySetup):
        self.setup = setup
        self.optimizer = setup.optimizer
        self.params = setup.params
        self.families = list(setup.families)
        self.indexes = list(setup.indexes)
        self.device = setup.device

    @classmethod
    def accepts(cls, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this strategy handles `optimizer` (asked for the class it is registered for and subclasses)."""
        return True

    def verdict(self, group: Mapping[str, Any]) -> Applicability:
        """Which predictions apply to one param group: the single decision of `theory/applicability.py`."""
        return applicability(self.optimizer, group)

    def note(self) -> str:
        """A run-level sentence on what is not predicted and what is measured instead ("" when all is predicted)."""
        return ""

    def facts(self) -> dict[str, Any]:
        """Run-level facts for the manifest: "equilibrium", whether scale groups have a predicted weight-decay
        equilibrium and why (`theory/applicability.equilibrium`, over the param groups holding tracked groups)."""
        tracked = sorted({i for ix in self.indexes for i in ix.pgs})
        verdicts = [equilibrium(self.optimizer, self.optimizer.param_groups[i]) for i in tracked]
        if not verdicts:
            return {}
        reasons = list(dict.fromkeys(v.reason for v in verdicts if not v.applies)) or [verdicts[0].reason]
        return {"equilibrium": {"applies": all(v.applies for v in verdicts), "reason": "; ".join(reasons)}}

    @abstractmethod
    def pre_step(self, ctx: StepContext, applies: Applies) -> None:
        """Measure at theta_k, g_k (before the update); advance the predictions k -> k+1; stage a log step's rows."""

    @abstractmethod
    def post_step(self, ctx: StepContext, applies: Applies) -> list[Row | None] | None:
        """Measure after the update; return the rows of a log step (per family, None for none), else None."""

    @abstractmethod
    def log_rows(self, ctx: StepContext, applies: Applies) -> list[Row | None]:
        """Rows for the current state outside a step (no gradient, no update: those columns are NaN)."""

    @abstractmethod
    def ready(self, step: int) -> bool:
        """Whether there is a state to log outside a step (after the first step, or a resumed one)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """The tracker is closing: release what the strategy put in place (Muon's capture)."""

    def family_state(self, i: int) -> dict[str, Any]:
        """Checkpoint of family i's prediction state (tensors, numbers, None: loads with weights_only=True)."""
        return {"exact": None, "breaking": None, "paper": None, "vel": None}

    def load_family_state(self, i: int, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore `family_state(i)` (the base strategy keeps no state)."""
