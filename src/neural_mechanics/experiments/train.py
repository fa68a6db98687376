"""The training run behind `nmech train`: a stock optimizer, the Tracker on its step hooks, checkpoints.

One run = one `TrainConfig`. `run_training` assembles the run from the harness's parts and runs it:

- the run directory (`experiments.rundir`: a new run never overwrites one, a resume needs something to
  resume, the directory is probed for writability before any work) and its checkpoint
  (`experiments.checkpoint`);
- data from the dataset registry (`experiments.datasets`), the model from its spec, the loss from the objective
  registry (`experiments.objectives`; the first batch is run once to check that outputs and targets pair under it,
  so a mismatch is a clear error before any step), the symmetries of that loss found on one real batch, the
  optimizer from the optimizer registry (`experiments.optimizers`);
- the step loop (`experiments.loop`: zero_grad, `grad_accumulation` micro-batches of the config's loss backward,
  optional global-norm clipping, `optimizer.step()`, `scheduler.step()`) with the callbacks of
  `experiments.callbacks` (metric logging, evaluation, checkpoints, progress bar).

Around it:

- determinism: everything random is seeded from `config.seed`; the data order of epoch e is a pure
  function of (seed, e), so a resumed run sees exactly the batches an uninterrupted run would, and the
  same config run twice writes identical frames (on the same machine and torch build);
- crash safety: checkpoints are written atomically and loaded only with `torch.load(weights_only=True)`. A
  run killed at any moment (SIGKILL included) leaves a readable run directory (the store writes every part
  and the manifest atomically); `resume=True` continues from the last checkpoint, the tracker drops the rows
  logged after it and re-logs them, so the final rows and predictions equal those of an uninterrupted run bit
  for bit. A run killed before its first checkpoint restarts from step 0 on resume (its rows are dropped and
  re-logged);
- hostile input: a non-finite loss or gradient, an unwritable or full run directory, a corrupt or
  foreign checkpoint, a config that does not match the checkpoint, a model the tracker cannot handle -
  each stops the run with an `NMechError` that says what to do; the run is marked failed and every row
  already flushed stays readable;
- distributed (torchrun, WORLD_SIZE > 1; `experiments.distributed`): the model is wrapped in
  DistributedDataParallel and each rank reads a disjoint shard of every global batch (rank r takes every
  world-th sample of the epoch's permutation, so the union of the shards of global batch k is exactly batch k
  of a single process with the global batch size). Every rank builds its own Tracker on the wrapped model;
  its step hooks fire in `optimizer.step()`, i.e. after DDP's gradient all-reduce, so every rank reduces the
  same synchronised gradients and advances identical predictions (checked at the end:
  `TrainResult.rank_disagreement`, also in the manifest). Only rank 0 writes rows, checkpoints and the
  manifest. Every rank starts from the same seed (identical initialisation), then, before the first step,
  ranks > 0 switch to their own random stream, so dropout draws independent masks on every rank as one
  process with the global batch would; checkpoints hold every rank's RNG state and a resumed rank continues
  its own. The loss and accuracy are all-reduced before logging and before the finiteness check, so all
  ranks stop together.
  BatchNorm under DDP normalises with per-rank batch statistics: a BN model trained on W ranks is NOT
  the same as one process with the global batch (it is one with W "ghost batches"). Its symmetries are
  still exact (each rank's loss is scale invariant), so the tracker's exact predictions still hold, but
  a bit-for-bit comparison with a single process needs a model without BatchNorm;
- sharded (`distributed.strategy: fsdp2`, `experiments.fsdp`): the symmetries are detected (and the start-of-run
  constraints checked) on the whole model, which is then sharded with FSDP2's `fully_shard`; the Tracker on the
  sharded model sums per rank over its shards and all-reduces, so every rank again advances the same
  predictions. Checkpoints are directories of shards (torch.distributed.checkpoint) written under a temporary
  name and renamed when complete. A model spec that returns an already sharded model, and FSDP1, are refused
  (`tracking.sharding`). docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor, nn

from neural_mechanics.constraints import check_constraints
from neural_mechanics.errors import CaptureError, ConfigError, InputShapeError, LossSpecError
from neural_mechanics.experiments.callbacks import (
    Checkpointing,
    Evaluation,
    ProgressBar,
    RankAgreement,
    StopAfter,
    TrainMetrics,
)
from neural_mechanics.experiments.checkpoint import Checkpointer, config_mismatch, load_checkpoint
from neural_mechanics.experiments.checks import MODEL_INPUT_ERRORS, forward_once
from neural_mechanics.experiments.config import TrainConfig, config_to_dict, lr_multiplier
from neural_mechanics.experiments.datasets import DatasetInfo, dataset_from_config, endless_batches, make_loader
from neural_mechanics.experiments.distributed import backend, dist_info, local_device, process_group, rank_seed
from neural_mechanics.experiments.loop import Callback, MetricRows, TrainLoop
from neural_mechanics.experiments.objectives import Objective, build_objective
from neural_mechanics.experiments.optimizers import build_optimizer
from neural_mechanics.experiments.rundir import RunDirectory, store_error
from neural_mechanics.experiments.specs import resolve_model
from neural_mechanics.symmetry import SymmetrySet
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking import store as run_store
from neural_mechanics.tracking.metrics import relative_errors
from neural_mechanics.tracking.param_trace import ParamTrace
from neural_mechanics.tracking.sharding import check_not_sharded
from neural_mechanics.tracking.tracker import Tracker

#: Above this many parameters the start-of-run constraint check skips the Hessian (HVPs in float64 are slow on CPU).
HESSIAN_CHECK_MAX_PARAMS = 2_000_000


@dataclass
class TrainResult:
    """What a finished run reports: where it is, how far it got, final metrics, prediction errors."""

    run_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    max_rel_error: dict[str, float] = field(default_factory=dict)
    """Per prediction ("exact", "breaking", "paper"): the largest relative error over all valid groups and steps."""
    n_groups: dict[str, int] = field(default_factory=dict)
    status: str = "finished"
    world_size: int = 1
    rank_disagreement: float | None = None
    """Under DDP: max over tracker state entries of (max - min over ranks); 0.0 when every rank agrees exactly."""


def pick_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device", "use auto, cpu, cuda or cuda:N") from exc


def run_training(cfg: TrainConfig, *, run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                 console: Any = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train `cfg` with the tracker attached; return where the run is and its final numbers.

    run_dir overrides `cfg.run_dir`. resume=True continues from `run_dir/checkpoint.pt` (or restarts a run that
    died before its first checkpoint from step 0). stop_after (tests, crash drills) stops after that many
    optimizer steps in this call, as if killed right after a checkpoint (one is written).
    """
    rank, world = dist_info()
    device = local_device(pick_device(cfg.device), world)
    with process_group(device, world):
        out_dir = Path(run_dir if run_dir is not None else cfg.resolved_run_dir)
        return _run(cfg, RunDirectory(out_dir, rank=rank, world=world), resume, console, progress, stop_after,
                    device)


def _run(cfg: TrainConfig, run: RunDirectory, resume: bool, console: Any, progress: bool, stop_after: int | None,
         device: torch.device) -> TrainResult:
    rank, world, out_dir = run.rank, run.world, run.path
    cfg_dict = config_to_dict(cfg)
    restart_note = run.prepare(resume)
    state: dict[str, Any] | None = None
    latest = run.latest_checkpoint()
    if resume and restart_note is None and latest is not None:
        state = load_checkpoint(latest, device)
        if state.get("config") is not None:
            diff = config_mismatch(state["config"], cfg_dict)
            if diff:
                raise ConfigError(f"the config differs from the one the checkpoint in {out_dir} was written with, "
                                  f"in: {', '.join(diff)}",
                                  "resume with the run's own config (manifest.json holds it), or start a new run "
                                  "in another --run-dir")

    # -- data, model, symmetries ------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg.loss)
    train_data = dataset_from_config(cfg.dataset, "train", seed=cfg.seed)
    eval_data = dataset_from_config(cfg.dataset, cfg.dataset.eval_split, seed=cfg.seed)
    resolved = resolve_model(cfg.model, num_classes=cfg.num_classes or train_data.num_classes,
                             input_shape=train_data.input_shape)
    model = resolved.model.to(device).train()
    fsdp = cfg.distributed.strategy == "fsdp2"
    if cfg.tracker.enabled or fsdp:
        check_not_sharded(model)
    first_batch = next(iter(make_loader(train_data, max(2, min(cfg.batch_size, 16)), seed=cfg.seed)))
    check_pairing(model, objective, first_batch, cfg, device)
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}",
                          "use a global batch size that is a multiple of the number of processes")
    loader = make_loader(train_data, cfg.batch_size // world, seed=cfg.seed, num_workers=cfg.dataset.num_workers,
                         drop_last=True, num_replicas=world, rank=rank)
    if len(loader) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_data)})",
                          "use a smaller batch_size")
    micro_per_step = cfg.grad_accumulation
    steps_per_epoch = max(len(loader) // micro_per_step, 1)
    total_steps = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 0) * steps_per_epoch)
    symmetries = _tracked_symmetries(cfg, model, first_batch[0], device, objective) if cfg.tracker.enabled else None
    constraints_done = False
    if fsdp and rank == 0 and state is None and symmetries is not None:  # while the model is whole
        _save_constraints(model, symmetries, train_data, out_dir, cfg.seed, device, objective)
        constraints_done = True

    # -- optimizer, tracker, run store ------------------------------------------------------------
    net: nn.Module = model
    if world > 1 and fsdp:
        from neural_mechanics.experiments.fsdp import shard_model  # ~2 s of imports: only for sharded runs

        net = shard_model(model, device, world)
    elif world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg.optimizer, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_multiplier(cfg.schedule, k, total_steps, steps_per_epoch))
    tracker: Tracker | None = None
    writer: Any = None
    try:
        if symmetries is not None and len(symmetries):
            tracker = Tracker(net, optimizer, symmetries, out_dir if rank == 0 else None,
                              log_every=cfg.tracker.log_every, log_spaced=cfg.tracker.log_spaced,
                              config=cfg_dict, rank=rank)
            writer = tracker.writer
        elif rank == 0:
            writer = run_store.RunWriter(out_dir, config=cfg_dict)
            writer.add_note("no symmetry tracked" if cfg.tracker.enabled else "tracker disabled in the config")
    except OSError as exc:
        raise store_error(exc, out_dir, "creating the run directory") from exc
    rows = MetricRows(writer)
    if tracker is not None and rank == 0 and state is None and symmetries is not None and not constraints_done:
        _save_constraints(model, symmetries, train_data, out_dir, cfg.seed, device, objective)
    if writer is not None and state is None:
        for note in (*train_data.notes, *(n for n in eval_data.notes if n not in train_data.notes)):
            writer.add_note(f"data: {note}")

    # -- resume -----------------------------------------------------------------------------------
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    checkpointer = _checkpointer_class(fsdp)(run.path if fsdp else run.checkpoint, model, optimizer, scheduler,
                                             scaler, tracker, writer, None, rows, cfg_dict, rank=rank, world=world,
                                             device=device)
    step = 0
    if state is not None:
        step = checkpointer.restore(state)
    elif restart_note is not None and writer is not None:
        dropped = writer.truncate_from(0)
        writer.add_note(f"{restart_note} (dropped {dropped} stored rows)")
        writer.write_manifest()
    trace = None
    if tracker is not None and rank == 0:  # after the restore: it samples theta at its first step right away
        previous = out_dir / "param_trace.parquet"
        trace = ParamTrace(net, optimizer, symmetries or (), every=cfg.tracker.log_every, seed=cfg.seed,
                           start_step=step,
                           previous=pd.read_parquet(previous) if state is not None and previous.is_file() else None)
        checkpointer.trace = trace
    if writer is not None and world > 1:
        writer.manifest["distributed"] = {"world_size": world, "backend": backend(device),
                                          "strategy": cfg.distributed.strategy,
                                          "batchnorm": "per-rank batch statistics (not SyncBatchNorm)"}
    batches = endless_batches(loader, step * micro_per_step)
    if state is None and world > 1 and rank > 0:
        torch.manual_seed(rank_seed(cfg.seed, rank))

    # -- the loop ---------------------------------------------------------------------------------
    agreement = RankAgreement(tracker, writer) if tracker is not None and world > 1 else None
    callbacks: list[Callback] = [
        *([StopAfter(stop_after)] if stop_after is not None else []),
        TrainMetrics(rows, cfg.tracker.log_every),
        Evaluation(model, eval_data, rows, cfg.dataset.eval_split, cfg.eval_every, rank=rank, world=world,
                   lockstep=fsdp and world > 1),
        *([agreement] if agreement is not None else []),
        Checkpointing(checkpointer, cfg.checkpoint_every),
        ProgressBar(cfg.name, console, enabled=progress and rank == 0),
    ]
    loop = TrainLoop(net, optimizer, scheduler, batches, device=device, total_steps=total_steps, start_step=step,
                     micro_per_step=micro_per_step, world=world, grad_clip=cfg.grad_clip, scaler=scaler,
                     autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision),
                     objective=objective, callbacks=callbacks)
    try:
        loop.run()
    except BaseException as exc:
        err: BaseException = exc
        if isinstance(exc, OSError):
            err = store_error(exc, out_dir, f"training step {loop.step}")
        _close_quietly(tracker, writer, "failed", f"{type(err).__name__}: {err} at step {loop.step}")
        if err is not exc:
            raise err from exc
        raise
    try:
        if trace is not None:
            trace.close()
            trace.save(out_dir)
        _close_run(tracker, writer, loop.status, loop.note)
    except OSError as exc:
        raise store_error(exc, out_dir, "closing the run") from exc
    result = TrainResult(run_dir=out_dir, steps=loop.step, metrics=loop.metrics, status=loop.status,
                         world_size=world, n_groups=symmetries.counts() if symmetries is not None else {},
                         rank_disagreement=agreement.disagreement if agreement is not None else None)
    if tracker is not None and rank == 0 and loop.status == "finished":
        result.max_rel_error = max_relative_errors(out_dir)
    return result


def _checkpointer_class(fsdp: bool) -> type[Checkpointer]:
    """One file (`checkpoint.pt`, at run.checkpoint), or sharded directories in the run directory for
    distributed.strategy=fsdp2 (on any world size, so a sharded run can resume on another one)."""
    if fsdp:
        from neural_mechanics.experiments.fsdp import ShardedCheckpointer  # ~2 s of imports: only for sharded runs

        return ShardedCheckpointer
    return Checkpointer


def check_pairing(model: nn.Module, objective: Objective, batch: tuple[Any, Any], cfg: TrainConfig,
                  device: torch.device) -> None:
    """Run the model once on the first training batch and check that its outputs and the batch's targets pair
    under the config's loss (`Objective.check`): a model that rejects the data is an InputShapeError and a wrong
    pairing a LossSpecError, both before any step. Without side effects: no gradient, the RNG forked, BatchNorm's
    running statistics restored (`checks.forward_once`)."""
    x, y = batch
    try:
        out = forward_once(model, x.to(device), cfg.seed)
    except MODEL_INPUT_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(
            f"model {cfg.model!r} cannot run on the data of dataset {cfg.dataset.name!r}: a batch of inputs of shape "
            f"{tuple(x.shape)} ({x.dtype}) raised {type(exc).__name__}: {first}",
            "make the model and the data agree: the model's input layer (channels, features, vocabulary, "
            "dtype), the dataset's input_shape/image_size/channels/seq_len, or num_classes") from exc
    try:
        objective.check(out, y.to(device))
    except LossSpecError as exc:
        raise LossSpecError(f"model {cfg.model!r} on dataset {cfg.dataset.name!r}: {exc.what}",
                            f"{exc.fix} (config: loss.name, loss.class_dim, num_classes, dataset)") from exc


def _tracked_symmetries(cfg: TrainConfig, model: nn.Module, x0: Tensor, device: torch.device,
                        objective: Objective) -> SymmetrySet:
    """The symmetries of the config's loss found on one real batch (batch statistics), of the kinds
    `cfg.tracker.kinds` asks for."""
    try:
        symmetries = find_symmetries(model, x0.to(device), loss=objective.spec)
    except CaptureError as exc:
        raise CaptureError(f"the tracker cannot analyse model {cfg.model!r}: {exc.what}",
                           f"{exc.fix + '; or ' if exc.fix else ''}train without the tracker: "
                           "--set tracker.enabled=false") from exc
    if set(cfg.tracker.kinds) != {"translation", "scale", "rescale"}:
        symmetries = symmetries.__class__([s for s in symmetries if s.kind in cfg.tracker.kinds], symmetries.meta)
    return symmetries


def _save_constraints(model: nn.Module, symmetries: Any, data: DatasetInfo, out_dir: Path, seed: int,
                      device: torch.device, objective: Objective) -> None:
    """Check the gradient (and, for small models, Hessian) constraints of the run's loss on one batch at step 0 and
    save them as `constraints.parquet` beside the run, where the report's constraint histograms read them. Best
    effort: a failure here is a warning, never a lost run."""
    if not len(symmetries):
        return
    try:
        x, y = next(iter(make_loader(data, 32, seed=seed)))
        n_params = sum(p.numel() for p in model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check_constraints(model, objective.spec, (x.to(device), y.to(device)), symmetries,
                                       hessian=n_params <= HESSIAN_CHECK_MAX_PARAMS, seed=seed)
        run_store.atomic_write_table(out_dir / "constraints.parquet",
                                     pa.Table.from_pandas(report.to_frame(), preserve_index=False))
    except Exception as exc:  # the check is an extra; training goes on
        warnings.warn(f"could not check the constraints at step 0: {exc}", RuntimeWarning, stacklevel=2)


def max_relative_errors(run_dir: Path) -> dict[str, float]:
    """Largest relative error of each prediction ("exact", "breaking", "paper") over all valid groups and steps,
    with the tracker's definition (`tracking.metrics.relative_errors`: |pred - measured| / max(norm, 1e-6 x the
    group's largest norm so far))."""
    df = run_store.open_run(run_dir).frame()
    if df.empty:
        return {}
    err = relative_errors(df)
    err = err[err["valid"]] if "valid" in err else err
    out: dict[str, float] = {}
    for name in ("exact", "breaking", "paper"):
        col = f"err_{name}"
        if col in err and err[col].notna().any():
            out[name] = float(err[col].max())
    return out


def _close_run(tracker: Any, writer: Any, status: str, note: str | None) -> None:
    """Record the run's final status: the tracker closes its own writer; without one, flush the writer and mark it."""
    if tracker is not None:
        tracker.close(status, note)
    elif writer is not None:
        writer.flush()
        writer.set_status(status, note)


def _close_quietly(tracker: Any, writer: Any, status: str, note: str) -> None:
    """Mark a failed run (flush what can be flushed); never let a second failure hide the first one."""
    try:
        _close_run(tracker, writer, status, note)
    except Exception as exc:
        warnings.warn(f"could not mark the run {status}: {exc}", RuntimeWarning, stacklevel=2)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.set_status(status, note)
