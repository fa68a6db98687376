"""The run-time half of the Tracker: its optimizer step hooks and the bookkeeping of every step.

`Tracker` (`tracker.py`, the public facade: construction, logging API, checkpoints, close) inherits these methods.
Per optimizer step, torch calls

    _pre_hook   (step pre hook)   validity checks (member without gradient, param groups with mixed values), the
                                  applicability decision when hyperparameters changed, then `strategy.pre_step`
    _post_hook  (step post hook)  `strategy.post_step`, the log step's rows to the sink (`_emit`), flushing

both under `hook_threads` torch threads and `torch.no_grad()`. Whether step k is logged (`_is_log_step`) is decided
here: every `log_every` steps, plus about 8 log-spaced steps per decade with `log_spaced`. Every per-group sum goes
through `_sums` (`self.reduction`, see `collective_sums.py`), the one place a test can watch them. Nothing here reads
a device value on the host between log steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.tracking.collective_sums import Reduction
from neural_mechanics.tracking.families import ChargeFamily
from neural_mechanics.tracking.param_groups import (
    HyperReader,
    ParamGroupIndex,
    missing_gradients,
    mixed_hyperparameters,
    read_values,
)
from neural_mechanics.tracking.products import Fields, Product
from neural_mechanics.tracking.rows import Row, RowEmitter
from neural_mechanics.tracking.sinks import Sink
from neural_mechanics.tracking.strategies import Applies, StepContext, Strategy

__all__ = ["StepHooks", "is_spaced"]


def is_spaced(k: int, per_decade: int = 8) -> bool:
    """True at about `per_decade` log-spaced steps per decade (1, 2, 3, 4, 5, 6, 7, 10, 13, 18, 24, ...)."""
    if k <= 0:
        return k == 0
    j = round(per_decade * math.log10(k))
    return any(round(10 ** (i / per_decade)) == k for i in (j - 1, j, j + 1) if i >= 0)


class StepHooks:
    """The optimizer hooks and per-step bookkeeping of `Tracker` (see the module docstring); not used on its own."""

    hook_threads: int | None = 1
    """Torch intra-op threads inside the hooks on CPU (restored after; None = leave torch's setting). The hooks'
    work is a few dozen memory-bound passes, which gain little from threads; on a machine whose cores are busy
    every multi-threaded op can wait a whole scheduler slice for its second thread (measured on 2 shared cores:
    16 ms per op instead of 0.5 ms, a 25x slower tracker), which a single thread never does."""

    # set by Tracker.__init__
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]
    device: torch.device
    families: list[ChargeFamily]
    indexes: list[ParamGroupIndex]
    reduction: Reduction
    strategy: Strategy
    hypers: HyperReader
    applies: Applies
    emitter: RowEmitter
    sink: Sink
    invalid: dict[str, str]
    log_every: int
    log_spaced: bool
    flush_every: int
    step: int
    _decided: tuple[Any, ...] | None
    _ctx: StepContext | None
    _last_logged: int

    @property
    def measures_logs(self) -> bool:
        """Whether log steps measure their rows here: where they are written, and on every rank of a sharded model
        (the log-only sums are collectives, so all ranks must take part)."""
        return self.sink.records or self.reduction.collective

    def _invalidate(self, fam: ChargeFamily, gids: list[int], reason: str) -> None:
        new = [g for g in gids if fam.names[g] not in self.invalid]
        if not new:
            return
        fam.valid.index_fill_(0, torch.tensor(new, dtype=torch.long, device=self.device), False)
        for g in new:
            self.invalid[fam.names[g]] = reason
            self.sink.mark_invalid(fam.names[g], reason)

    def _decide(self, values: list[tuple[Any, ...]]) -> None:
        """Ask the strategy's applicability for every param group when the values changed; record what changed."""
        key = HyperReader.key(values)
        if key is not None and key == self._decided:
            return
        self._decided = key
        if self.applies.update([self.strategy.verdict(pg) for pg in self.optimizer.param_groups]):
            self.sink.set_fact("applicability", self.applies.snapshot())

    def _is_log_step(self, k: int) -> bool:
        return k % self.log_every == 0 or (self.log_spaced and is_spaced(k))

    def _sums(self, family: ChargeFamily, products: Sequence[Product], fields: Fields) -> dict[str, Tensor]:
        """Every per-group sum of the tracker goes through here (`self.reduction`: `products.reduce_products` on the
        whole parameters, or per-rank partial sums plus an all_reduce for sharded ones); a test can watch it."""
        return self.reduction(family, products, fields)

    def _step_context(self, step: int, log: bool, values: Any) -> StepContext:
        return StepContext(step, log, values, self.hypers(values), self._sums, batch=self.reduction.batch,
                           defer=self.reduction.defer)

    # ---- hooks ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Run the block with `hook_threads` torch threads on CPU (see there), restoring the setting after."""
        n = torch.get_num_threads()
        want = self.hook_threads
        if self.device.type != "cpu" or want is None or want >= n:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """Measure theta_k and g_k before the update.

        With `optimizer.step(closure)` the gradients do not exist yet when this hook runs: the closure computes
        them inside `step`. The hook then hands `step` a wrapped closure (step pre-hooks may return new
        (args, kwargs)) that measures right after the first evaluation, at theta_k - the same moment as
        backward-then-step. Later evaluations (line searches) are not measured.
        """
        # torch passes the bound call's positional args, optimizer first: (optimizer, closure?)
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            with self._threads(), torch.no_grad():
                self._pre()
            return None
        measured = False

        def measuring_closure() -> Any:
            nonlocal measured
            loss = closure()
            if not measured:
                measured = True
                with self._threads(), torch.no_grad():
                    self._pre()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measuring_closure}
        return (args[0], measuring_closure, *args[2:]), kwargs

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._threads(), torch.no_grad():
            self._post()

    def _context(self, step: int, log: bool) -> StepContext:
        return self._step_context(step, log, read_values(self.optimizer, self.strategy.hyper_keys))

    def _pre(self) -> None:
        k = self.step
        values = read_values(self.optimizer, self.strategy.hyper_keys)
        for fam, ix in zip(self.families, self.indexes, strict=True):
            for gids, reason in missing_gradients(ix, self.params, k):
                self._invalidate(fam, gids, reason)
        for fam, ix in zip(self.families, self.indexes, strict=True):
            for gids, reason in mixed_hyperparameters(ix, values, self.strategy.hyper_keys, k):
                self._invalidate(fam, gids, reason)
        self._decide(values)
        self._ctx = self._step_context(k, self._is_log_step(k) and self.measures_logs, values)
        self.strategy.pre_step(self._ctx, self.applies)

    def _post(self) -> None:
        k = self.step
        ctx = self._ctx if self._ctx is not None else self._context(k, False)
        rows = self.strategy.post_step(ctx, self.applies)
        self.reduction.end_step()
        if ctx.log and rows is not None:
            self._emit(k, rows)
            self._last_logged = k
        self._ctx = None
        self.step = k + 1
        if self.step % self.flush_every == 0:
            self.sink.flush()

    def _emit(self, step: int, rows: Sequence[Row | None]) -> None:
        """Move the rows of every family to the host (one transfer per family) and hand them to the sink."""
        if not self.sink.records:
            return
        frames = self.emitter.frames(step, rows)
        if frames is None:
            return
        groups, layers = frames
        self.sink.write_groups(groups)
        self.sink.write_layers(layers)
