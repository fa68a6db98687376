"""The streaming Tracker: measured charges next to exact and paper predictions, every step, on the device.

`Tracker(model, optimizer, symmetries, run_dir)` attaches to a stock torch.optim optimizer through
`register_step_pre_hook` / `register_step_post_hook` (no forked optimizer, no patched `step`), so whatever
the training loop does to the gradients before `step()` (global-norm clipping, accumulation, AMP unscaling)
is what it sees, and it reads the hyperparameters from `optimizer.param_groups` at every step (any scheduler
works). This module is the public facade: construction (groups, strategy, sink, the hooks' registration), the
logging API, checkpoints and close. The hooks themselves and the bookkeeping of every step (log decisions,
validity, applicability, the one reduction function) are `step_hooks.py`, which `Tracker` inherits; the work is
done by

* `families.py`      the groups compiled per charge type (quadratic: scale + rescale; linear: translation);
* `param_groups.py`  where their members sit in the param groups, the hyperparameters per group, and the checks
                     that take a group out of the theory (member not in the optimizer, no gradient, mixed values:
                     NaN predictions, `valid=False`, the reason in the manifest's "invalid");
* `strategies/`      one strategy per optimizer family, chosen by the optimizer's class: its per-step
                     measurements (`products.py`), recurrences (`theory/`) and predictions; which prediction
                     applies is `theory/applicability.py`'s decision (the manifest's "applicability");
* `rows.py`, `metrics.py`  rows to the host at log steps (one transfer per family), per-layer aggregates and
                     the relative error (`RELATIVE_ERROR_FLOOR`);
* `sinks.py`         where rows go: the Parquet run store of run_dir, nothing, TensorBoard, several.

Every per-group sum is formed through `Tracker._sums` (each product once per parameter, reduced onto the cells of
`symmetry/incidence.py` in the parameter's dtype within a slice and float64 across slices). Quantities stay on the
device in float64; the host only sees them at log steps. The columns a logged step writes are listed in
`store.py` (GROUP_COLUMNS) and explained in `rows.py` and the strategies.

Sharded models (FSDP2, parameters are DTensors): `_sums` forms every rank's partial sums on its local shards and
adds them over ranks (`collective_sums.py`: one all_reduce per step for the built-in strategies), so every rank
advances the same predictions; every rank then takes the same log decisions (measuring a log step's sums even
where it writes nothing), because the collectives must match. FSDP1 is refused (`sharding.py`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.groups import Symmetry, SymmetrySet
from neural_mechanics.tracking.collective_sums import make_reduction
from neural_mechanics.tracking.families import ChargeFamily, compile_families
from neural_mechanics.tracking.param_groups import HyperReader, ParamGroupIndex, read_values
from neural_mechanics.tracking.parameters import canonical_name, resolve_parameters
from neural_mechanics.tracking.rows import RowEmitter
from neural_mechanics.tracking.sharding import refuse_fsdp1
from neural_mechanics.tracking.sinks import NullSink, ParquetSink, RunInfo, Sink, SinkGroup
from neural_mechanics.tracking.step_hooks import StepHooks
from neural_mechanics.tracking.store import RunWriter, open_run
from neural_mechanics.tracking.strategies import Applies, StepContext, StrategySetup, strategy_for

__all__ = ["STATE_VERSION", "Tracker", "canonical_name", "resolve_parameters"]

STATE_VERSION = 1


class Tracker(StepHooks):
    """Watch every symmetry's charge during training, next to its exact and paper predictions.

        with nm.Tracker(model, optimizer, symmetries, "runs/a", log_every=10) as tracker:
            for x, y in loader:
                optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
                tracker.log_metrics(tracker.step, loss=loss.item())

    `state_dict()` / `load_state_dict()` work like an optimizer's: checkpoint them with the model and the
    optimizer, and a run resumed into the same run_dir continues (rows from the checkpoint step on are
    replaced, see `store.py`) with predictions identical to an uninterrupted run. Under DDP build one Tracker
    per rank on the wrapped model; under FSDP2 one per rank on the sharded model (detect the symmetries on the
    model before `fully_shard`: names are kept); only rank 0 writes. `sink` adds sinks (e.g.
    `TensorBoardSink(dir)`) next to the run store of `run_dir`; on ranks other than 0 nothing is written.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, symmetries: SymmetrySet | Iterable[Symmetry],
                 run_dir: str | os.PathLike[str] | None = None, *, log_every: int = 10, log_spaced: bool = False,
                 flush_every: int = 200, config: Mapping[str, Any] | None = None,
                 paper_prefactor: str = "derived", rank: int | None = None, sink: Sink | Sequence[Sink] | None = None):
        if log_every < 1 or flush_every < 1:
            raise TrackerError(f"log_every and flush_every must be >= 1 (got {log_every}, {flush_every})",
                               "pass positive integers")
        self.symmetries = symmetries if isinstance(symmetries, SymmetrySet) else SymmetrySet(symmetries)
        if len(self.symmetries) == 0:
            raise TrackerError("the symmetry set is empty, so there is nothing to track",
                               "pass nm.find_symmetries(model, example_inputs)")
        refuse_fsdp1(model)
        self.model = model
        self.optimizer = optimizer
        self.log_every = int(log_every)
        self.log_spaced = bool(log_spaced)
        self.flush_every = int(flush_every)
        self.paper_prefactor = paper_prefactor
        self.step = 0
        """Number of optimizer steps seen so far (the index k of the next step)."""
        self.params = resolve_parameters(model, {m.param for s in self.symmetries for m in s.members})
        devices = {p.device for p in self.params.values()}
        if len(devices) != 1:
            raise TrackerError(f"tracked parameters live on several devices ({sorted(map(str, devices))})",
                               "the tracker supports models on one device (DDP replicas are fine)")
        self.device: torch.device = devices.pop()
        # members are validated (ranges, A1/A2 overlap) while compiling, without Symmetry.check's dense masks
        self.families: list[ChargeFamily] = compile_families(self.symmetries, {n: p.shape for n, p in
                                                                               self.params.items()}, self.device)
        self.indexes = [ParamGroupIndex(f, self.params, optimizer) for f in self.families]
        self.reduction = make_reduction(self.families, self.params)
        """How per-group sums are formed: on the whole parameters, or per shard plus an all_reduce (FSDP2)."""
        self.invalid: dict[str, str] = {}
        """Groups out of the theory, with the first reason (also in the run's manifest)."""
        self.sink: Sink = NullSink()
        for fam, ix in zip(self.families, self.indexes, strict=True):
            for gids, reason in ix.missing:
                self._invalidate(fam, gids, reason)
        self.strategy = strategy_for(optimizer)(StrategySetup(optimizer, self.params, self.families, self.indexes,
                                                              self.device, paper_prefactor,
                                                              collective=self.reduction.collective))
        self.hypers = HyperReader(optimizer, self.indexes)
        self.applies = Applies(self.families, self.indexes)
        self._decided: tuple[Any, ...] | None = None
        self._decide(read_values(optimizer, self.strategy.hyper_keys))
        if rank is None:
            rank = (torch.distributed.get_rank()
                    if torch.distributed.is_available() and torch.distributed.is_initialized() else 0)
        self.rank = rank
        self.sink = self._make_sink(run_dir, rank, sink)
        self.emitter = RowEmitter(self.families)
        facts: dict[str, Any] = {"applicability": self.applies.snapshot(), **self.strategy.facts()}
        if self.not_applicable:
            facts["not_applicable"] = self.not_applicable
        self.sink.start(RunInfo(config=config, hyperparameters=self._hyper_summary(), symmetries=self.symmetries,
                                settings=self._settings(), facts=facts, invalid=dict(self.invalid)))
        self._resumed = False
        self._ctx: StepContext | None = None
        self._last_logged = -1
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                         optimizer.register_step_post_hook(self._post_hook)]
        self.closed = False

    # ---- properties ----------------------------------------------------------------------------
    @property
    def exact_theory(self) -> bool:
        """Whether the optimizer's strategy predicts the charges (False: measured only)."""
        return self.strategy.exact_theory

    @property
    def not_applicable(self) -> str:
        """Why the predictions do not apply to this optimizer ("" when they do)."""
        return self.strategy.note()

    @property
    def writer(self) -> RunWriter | None:
        """The run store writer of run_dir (None without run_dir or on a rank other than 0)."""
        return self.sink.writer

    @staticmethod
    def _make_sink(run_dir: str | os.PathLike[str] | None, rank: int, extra: Sink | Sequence[Sink] | None) -> Sink:
        if rank != 0:
            return NullSink()
        sinks: list[Sink] = [] if run_dir is None else [ParquetSink(run_dir)]
        if extra is not None:
            sinks += [extra] if isinstance(extra, Sink) else list(extra)
        if not sinks:
            return NullSink()
        return sinks[0] if len(sinks) == 1 else SinkGroup(sinks)

    def _settings(self) -> dict[str, Any]:
        return {"log_every": self.log_every, "log_spaced": self.log_spaced, "flush_every": self.flush_every,
                "optimizer": type(self.optimizer).__name__, "strategy": self.strategy.name,
                "exact_theory": self.exact_theory, "paper_prefactor": self.paper_prefactor,
                "memory_note": self.strategy.memory_note, "sharded": self.reduction.collective}

    def _hyper_summary(self) -> dict[str, Any]:
        groups = []
        for pg in self.optimizer.param_groups:
            d = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                 for k, v in pg.items() if k != "params"}
            d["n_params"] = len(pg["params"])
            groups.append(d)
        return {"optimizer": type(self.optimizer).__name__, "param_groups": groups}

    # ---- public API -------------------------------------------------------------------------------
    def log_metrics(self, step: int, split: str = "train", **values: float | Tensor) -> None:
        """Append training-loop metrics (step, split, name, value) to the run's metrics table."""
        if not self.sink.records or not values:
            return
        names = list(values)
        vals = [float(v.item()) if isinstance(v, Tensor) else float(v) for v in values.values()]
        self.sink.write_metrics({"step": [int(step)] * len(names), "split": [split] * len(names),
                                 "name": names, "value": vals})

    def flush(self) -> None:
        """Write buffered rows to new part files now (atomic; cheap to call)."""
        self.sink.flush()

    @torch.no_grad()
    def log_now(self) -> None:
        """Log the current state (theta at step `self.step`, predictions for it) outside a step.

        Sharded: a collective, so every rank calls it (`close` does, on all ranks alike)."""
        if not self.measures_logs or not self.strategy.ready(self.step):
            return
        rows = self.strategy.log_rows(self._context(self.step, True), self.applies)
        self.reduction.end_step()
        self._emit(self.step, rows)
        self._last_logged = self.step

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors, lists, dicts, str, numbers: loads with weights_only=True).

        Flushes buffered rows first, so the run directory holds every row up to this checkpoint.
        """
        self.flush()
        fams = []
        for i, fam in enumerate(self.families):
            fams.append({"names": list(fam.names), "valid": fam.valid.cpu().clone(),
                         **self.strategy.family_state(i), "norm_max": self.emitter.state(i),
                         "applies": self.applies.state(i)})
        return {"version": STATE_VERSION, "step": self.step, "families": fams, "invalid": dict(self.invalid),
                "exact_theory": self.exact_theory, "applicability": self.applies.snapshot()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`: restores the step, predictions and validity; truncates the run_dir there.

        Checkpoints of version 1 written before the strategy redesign load too (they have no "applies" and
        "applicability" entries: the predictions' applicability is then decided again at the next step).
        """
        if int(state.get("version", -1)) != STATE_VERSION:
            raise TrackerError(f"tracker state has version {state.get('version')}, expected {STATE_VERSION}",
                               "resume with the neural-mechanics version that wrote the checkpoint")
        fams = state["families"]
        if [f["names"] for f in fams] != [f.names for f in self.families]:
            raise TrackerError("the tracker state was saved for a different symmetry set",
                               "build the Tracker with the symmetries of the checkpointed run (manifest.json)")
        self.step = int(state["step"])
        for i, (fam, fs) in enumerate(zip(self.families, fams, strict=True)):
            fam.valid = fs["valid"].to(self.device).clone()
            self.emitter.load_state(i, fs.get("norm_max"))
            self.applies.load_state(i, fs.get("applies"))
            self.strategy.load_family_state(i, fs)
        self.invalid = dict(state.get("invalid", {}))
        self.applies.restore(state.get("applicability"))
        self.sink.set_fact("applicability", self.applies.snapshot())
        self.sink.resume(self.step, self.invalid)
        self._resumed = True

    def close(self, status: str = "finished", note: str | None = None) -> None:
        """Detach the hooks, log the final state if it is a log step, flush, and mark the run's status."""
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.remove()
        self.strategy.close()
        if status == "finished" and self._is_log_step(self.step) and self._last_logged != self.step:
            try:
                self.log_now()
            except Exception as e:  # never lose the run over the final row
                warnings.warn(f"could not log the final step: {e}", RuntimeWarning, stacklevel=2)
        self.sink.close(status, note)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("failed", f"{exc_type.__name__}: {exc} at step {self.step}")

    def frame(self) -> pd.DataFrame:
        """The rows written so far (flushes first); requires a run_dir."""
        run_dir = self.sink.run_dir
        if run_dir is None:
            raise TrackerError("this tracker has no run_dir (or is not rank 0)", "pass run_dir to the Tracker")
        self.flush()
        return open_run(run_dir).frame()
