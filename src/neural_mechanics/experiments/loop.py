"""The optimizer-step loop, and the events it emits to callbacks.

One step is deliberately ordinary (the tracker must work on anybody's loop): zero_grad, `micro_per_step`
micro-batches of forward + loss backward (under DDP, `no_sync` for all but the last, under FSDP2 no gradient
reduce-scatter for all but the last; under fp16 through the grad scaler), the loss and accuracy all-reduced
over ranks, a finiteness check of the loss and of the global
gradient norm (clipped to `grad_clip` if set), `optimizer.step()`, `scheduler.step()`. The tracker is not
part of the loop: it rides on the optimizer's step hooks.

Everything else a run does around the steps is a `Callback` reacting to the loop's events, in list order:

    on_start      before the first step of this call
    before_step   before each step (a callback may `loop.request_stop(...)` here)
    after_step    after each step (`loop.step` counts finished steps)
    on_loop_end   after the last step, or after a requested stop (`loop.status` says which)
    on_close      always, last, also after an exception (release what on_start took)

`experiments.callbacks` holds the run's callbacks (progress bar, metric logging, evaluation, checkpoints).
`Objective` (experiments.objectives) says how outputs meet targets; the default is classification with
cross-entropy. Accuracy is the fraction of correct predictions over target elements (examples, pixels or tokens);
an objective without accuracy (mse) leaves `train_accuracy` NaN.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from neural_mechanics.errors import NMechError
from neural_mechanics.experiments.datasets import DatasetInfo, make_loader
from neural_mechanics.experiments.distributed import all_reduce_sum
from neural_mechanics.experiments.objectives import Objective, build_objective

__all__ = ["CLASSIFICATION", "Callback", "MetricRows", "Objective", "TrainLoop", "TrainingDivergedError", "evaluate"]


class TrainingDivergedError(NMechError):
    """The loss or the gradients stopped being finite."""


#: The default objective: classification with cross-entropy over dim 1.
CLASSIFICATION = build_objective("cross_entropy")


class Callback:
    """Reacts to the loop's events (see the module docstring); every method is a no-op unless overridden."""

    def on_start(self, loop: TrainLoop) -> None:
        pass

    def before_step(self, loop: TrainLoop) -> None:
        pass

    def after_step(self, loop: TrainLoop) -> None:
        pass

    def on_loop_end(self, loop: TrainLoop) -> None:
        pass

    def on_close(self, loop: TrainLoop) -> None:
        pass


class TrainLoop:
    """Steps `net` with `optimizer` on `batches` from `start_step` up to `total_steps`, emitting events.

    State the callbacks read: step (finished optimizer steps), steps_this_call, total_steps, train_loss and
    train_accuracy (of the last step, averaged over micro-batches and ranks), metrics (the run's latest
    numbers; callbacks add theirs), status ("finished", or what `request_stop` set) and note.
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 batches: Iterator[tuple[Tensor, Tensor]], *, device: torch.device, total_steps: int,
                 start_step: int = 0, micro_per_step: int = 1, world: int = 1, grad_clip: float | None = None,
                 scaler: torch.amp.GradScaler | None = None, autocast_dtype: torch.dtype | None = None,
                 objective: Objective = CLASSIFICATION, callbacks: Sequence[Callback] = ()):
        self.net, self.optimizer, self.scheduler, self.batches = net, optimizer, scheduler, batches
        self.device, self.total_steps, self.micro_per_step, self.world = device, total_steps, micro_per_step, world
        self.grad_clip, self.scaler, self.autocast_dtype = grad_clip, scaler, autocast_dtype
        self.objective = objective
        self.callbacks = list(callbacks)
        self.step = start_step
        self.steps_this_call = 0
        self.started = time.perf_counter()
        self.train_loss = math.nan
        self.train_accuracy = math.nan
        self.metrics: dict[str, float] = {}
        self.status = "finished"
        self.note: str | None = None
        self._stop = False

    @property
    def lr(self) -> float:
        """The learning rate of the first param group now (after the scheduler's step)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def elapsed(self) -> float:
        """Seconds since `run` started."""
        return time.perf_counter() - self.started

    def request_stop(self, status: str, note: str | None = None) -> None:
        """End the loop before the next step, with `status` (e.g. "running": resumable) and a note."""
        self._stop, self.status, self.note = True, status, note

    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self)

    def run(self) -> None:
        """Step until `total_steps` or a requested stop; exceptions propagate after every `on_close`."""
        self.started = time.perf_counter()
        try:
            self._emit("on_start")
            while self.step < self.total_steps:
                self._emit("before_step")
                if self._stop:
                    break
                self._one_step()
                self._emit("after_step")
            self._emit("on_loop_end")
        finally:
            self._emit("on_close")

    def _one_step(self) -> None:
        net, optimizer, scaler, m = self.net, self.optimizer, self.scaler, self.micro_per_step
        optimizer.zero_grad(set_to_none=True)
        objective = self.objective
        loss_sum, correct, seen = 0.0, 0, 0
        for micro in range(m):
            x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = self.world == 1 or micro == m - 1
            no_sync = not sync and isinstance(net, nn.parallel.DistributedDataParallel)
            if m > 1 and hasattr(net, "set_requires_gradient_sync"):  # FSDP2: accumulate unsharded, reduce at the end
                cast(Any, net).set_requires_gradient_sync(sync)
            with net.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    out = net(x)
                    loss = objective.loss(out, y) / m
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += float(loss.detach()) * m
            hits = objective.correct(out, y) if objective.has_accuracy else None
            correct += int(hits) if hits is not None else 0
            seen += objective.count(y)
        loss_sum, correct_f, seen_f = all_reduce_sum([loss_sum, float(correct), float(seen)], self.device, self.world)
        train_loss = loss_sum / (m * self.world)
        if not math.isfinite(train_loss):
            raise TrainingDivergedError(
                f"the training loss became {train_loss} at step {self.step} (lr {self.lr:g})",
                "lower optimizer.lr, set grad_clip, or use precision fp32; the rows logged so far are kept "
                "in the run directory (start a new run, --resume would diverge again)")
        if self.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
        if scaler is None and not math.isfinite(float(grad_norm)):
            raise TrainingDivergedError(
                f"the gradients became non-finite (global norm {float(grad_norm)}) at step {self.step} although "
                f"the loss is {train_loss:g}",
                "lower optimizer.lr or set grad_clip (clipping cannot repair inf/nan gradients: look for "
                "an overflow in the model); the rows logged so far are kept in the run directory")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.steps_this_call += 1
        self.train_loss = train_loss
        self.train_accuracy = correct_f / max(seen_f, 1.0) if objective.has_accuracy else math.nan
        self.metrics["train_loss"] = self.train_loss
        if objective.has_accuracy:
            self.metrics["train_accuracy"] = self.train_accuracy


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetInfo, device: torch.device, batch_size: int = 512, *,
             rank: int = 0, world: int = 1, objective: Objective = CLASSIFICATION,
             lockstep: bool = False) -> dict[str, float]:
    """Mean loss (per target element) and accuracy (if the objective has one) over a whole split, in eval mode
    (mode restored afterwards).

    Under DDP (world > 1) rank r evaluates samples r, r + world, ... (each sample exactly once, no padding) and
    the sums (loss, correct, count) are all-reduced, so every rank returns the whole split's numbers.
    lockstep (a sharded model: every forward gathers the parameters, a collective): every rank runs as many
    forwards as the rank with the most batches, repeating its last batch (or one sample) and counting nothing.
    """
    was_training = model.training
    model.eval()
    dataset = data.dataset
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    loader = make_loader(dataset, batch_size, shuffle=False)
    total, loss_sum, correct = 0, 0.0, 0
    x = None
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(objective.loss(out, y, reduction="sum"))
        hits = objective.correct(out, y) if objective.has_accuracy else None
        correct += int(hits) if hits is not None else 0
        total += objective.count(y)
    if lockstep:
        most = math.ceil(math.ceil(len(data.dataset) / world) / batch_size)  # type: ignore[arg-type]
        filler = x if x is not None else data.dataset[0][0].unsqueeze(0).to(device)
        for _ in range(most - len(loader)):
            model(filler)
    model.train(was_training)
    loss_sum, correct_f, total_f = all_reduce_sum([loss_sum, float(correct), float(total)], device, world)
    out_metrics = {"loss": loss_sum / max(total_f, 1.0)}
    if objective.has_accuracy:
        out_metrics["accuracy"] = correct_f / max(total_f, 1.0)
    return out_metrics


class MetricRows:
    """Metric rows (step, split, name, value) for the run store, remembering those of the current step.

    The rows logged at a checkpoint step K are saved in the checkpoint: resuming truncates stored rows from
    step K on (the tracker re-logs its own rows for K), so the loop re-appends these.
    """

    def __init__(self, writer: Any):
        self.writer = writer
        self.step = -1
        self.rows: list[list[Any]] = []

    def log(self, step: int, split: str, **values: float) -> None:
        """Append rows; a (step, split, name) already logged at this step is not logged twice."""
        if step != self.step:
            self.step, self.rows = step, []
        seen = {(r[1], r[2]) for r in self.rows}
        values = {k: v for k, v in values.items() if (split, k) not in seen}
        for name, value in values.items():
            self.rows.append([int(step), split, name, float(value)])
        if self.writer is not None and values:
            self.writer.append("metrics", {"step": [int(step)] * len(values), "split": [split] * len(values),
                                           "name": list(values), "value": [float(v) for v in values.values()]})

    def state(self, step: int) -> list[list[Any]]:
        """The rows logged at `step` (empty if the last logged step is another one)."""
        return [list(r) for r in self.rows] if step == self.step else []

    def restore(self, rows: list[list[Any]]) -> None:
        """Log `rows` (from `state`) again."""
        for step, split, name, value in rows:
            self.log(int(step), str(split), **{str(name): float(value)})
