"""The callbacks `nmech train` runs its loop with (see `experiments.loop` for the events).

`run_training` passes them in this order, which is the order of their effects within a step and at the end:

    StopAfter       stop after N steps of this call, as if killed right after a checkpoint (tests, drills)
    TrainMetrics    log train loss, accuracy (when the objective has one) and lr every `log_every` steps and at
                    the last step
    Evaluation      evaluate every `eval_every` steps (not at the last step) and once at the end of a finished run
                    (a sharded model: in lockstep, every forward being a collective)
    RankAgreement   under DDP or FSDP2 with the tracker: how far the ranks' tracker states drifted apart (0.0 =
                    exactly equal)
    Checkpointing   checkpoint every `every` steps, and at the end when asked to or when the run stops unfinished
    ProgressBar     the rich progress bar (loss, accuracy, steps/s, ETA) on rank 0
"""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from neural_mechanics.experiments.checkpoint import Checkpointer
from neural_mechanics.experiments.datasets import DatasetInfo
from neural_mechanics.experiments.distributed import rank_disagreement
from neural_mechanics.experiments.loop import Callback, MetricRows, TrainLoop, evaluate


class StopAfter(Callback):
    """Request a stop (status "running", resumable) once `steps` steps have run in this call."""

    def __init__(self, steps: int):
        self.steps = steps

    def before_step(self, loop: TrainLoop) -> None:
        if loop.steps_this_call >= self.steps:
            loop.request_stop("running", f"stopped after {loop.steps_this_call} steps (stop_after)")


class TrainMetrics(Callback):
    """Log the last step's loss, accuracy (classification objectives) and learning rate as "train" rows at steps
    k*every and at the last step."""

    def __init__(self, rows: MetricRows, every: int):
        self.rows, self.every = rows, every

    def after_step(self, loop: TrainLoop) -> None:
        if loop.step % self.every == 0 or loop.step == loop.total_steps:
            accuracy = {"accuracy": loop.train_accuracy} if loop.objective.has_accuracy else {}
            self.rows.log(loop.step, "train", loss=loop.train_loss, **accuracy, lr=loop.lr)


class Evaluation(Callback):
    """Evaluate `model` on `data` every `every` steps before the last (0: never), and once at the end of a finished
    run; the numbers go to `loop.metrics` as eval_* and to the rows under the split's name."""

    def __init__(self, model: Any, data: DatasetInfo, rows: MetricRows, split: str, every: int, *, rank: int = 0,
                 world: int = 1, lockstep: bool = False):
        self.model, self.data, self.rows, self.split, self.every = model, data, rows, split, every
        self.rank, self.world, self.lockstep = rank, world, lockstep

    def _evaluate(self, loop: TrainLoop) -> None:
        ev = evaluate(self.model, self.data, loop.device, rank=self.rank, world=self.world, objective=loop.objective,
                      lockstep=self.lockstep)
        loop.metrics.update({f"eval_{k}": v for k, v in ev.items()})
        self.rows.log(loop.step, self.split, **ev)

    def after_step(self, loop: TrainLoop) -> None:
        if self.every and loop.step % self.every == 0 and loop.step < loop.total_steps:
            self._evaluate(loop)

    def on_loop_end(self, loop: TrainLoop) -> None:
        if loop.status == "finished":
            self._evaluate(loop)


class RankAgreement(Callback):
    """At the end of a DDP run with the tracker: the largest spread of any tracker state entry over ranks, kept
    as `disagreement` and in the manifest's "distributed" section (when this rank writes one)."""

    def __init__(self, tracker: Any, writer: Any):
        self.tracker, self.writer = tracker, writer
        self.disagreement: float | None = None

    def on_loop_end(self, loop: TrainLoop) -> None:
        self.disagreement = rank_disagreement(self.tracker.state_dict(), loop.device)
        if self.writer is not None:
            self.writer.manifest["distributed"]["rank_disagreement"] = self.disagreement


class Checkpointing(Callback):
    """Save a checkpoint every `every` steps (0: never during the run) and at the end of the loop when `every` > 0
    or when the run stops unfinished (so it can be resumed)."""

    def __init__(self, checkpointer: Checkpointer, every: int):
        self.checkpointer, self.every = checkpointer, every

    def after_step(self, loop: TrainLoop) -> None:
        if self.every and loop.step % self.every == 0:
            self.checkpointer.save(loop.step)

    def on_loop_end(self, loop: TrainLoop) -> None:
        if self.every or loop.status != "finished":
            self.checkpointer.save(loop.step)


class ProgressBar(Callback):
    """A rich progress bar: steps done of the total, last loss and accuracy, steps/s of this call, ETA."""

    def __init__(self, description: str, console: Any = None, *, enabled: bool = True):
        self.description = description
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}{task.fields[acc]}"),
                            TextColumn("{task.fields[rate]:.1f} steps/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=console, disable=not enabled, transient=False)
        self.task: TaskID | None = None
        self.running = False

    def on_start(self, loop: TrainLoop) -> None:
        self.bar.start()
        self.running = True
        self.task = self.bar.add_task(self.description, total=loop.total_steps, completed=loop.step,
                                      loss=float("nan"), acc="", rate=0.0)

    def after_step(self, loop: TrainLoop) -> None:
        assert self.task is not None
        acc = f"  acc {loop.train_accuracy:.3f}" if loop.objective.has_accuracy else ""
        self.bar.update(self.task, completed=loop.step, loss=loop.train_loss, acc=acc,
                        rate=loop.steps_this_call / max(loop.elapsed, 1e-9))

    def on_loop_end(self, loop: TrainLoop) -> None:
        self._stop()

    def on_close(self, loop: TrainLoop) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.running:  # once: rich prints a newline per stop() on a non-interactive console
            self.running = False
            self.bar.stop()
