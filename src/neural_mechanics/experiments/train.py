"""The training loop behind `nmech train`: a stock optimizer, the Tracker on its step hooks, checkpoints.

One run = one `TrainConfig`. The loop is deliberately ordinary (the tracker must work on anybody's
loop): zero_grad, `grad_accumulation` micro-batches of cross-entropy backward, optional global-norm
clipping, `optimizer.step()`, `scheduler.step()`. Around it:

- determinism: everything random is seeded from `config.seed`; the data order of epoch e is a pure
  function of (seed, e), so a resumed run sees exactly the batches an uninterrupted run would;
- checkpoints (`checkpoint.pt`, written atomically, loadable with `torch.load(weights_only=True)`) hold
  model, optimizer, scheduler, tracker state, RNG states and the step; `resume=True` continues from the
  last one into the same run directory, and the tracker's predictions continue as if never stopped;
- a non-finite loss stops the run with a clear error, the run is marked failed, nothing written is lost;
- under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, each rank reads a
  disjoint shard of every global batch, and only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics.errors import ConfigError, NMechError, RunStoreError
from neural_mechanics.experiments.config import TrainConfig, config_to_dict, lr_multiplier
from neural_mechanics.experiments.datasets import DatasetInfo, load_dataset, make_loader
from neural_mechanics.experiments.specs import resolve_model

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    """What a finished run reports: where it is, how far it got, final metrics, prediction errors."""

    run_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    max_rel_error: dict[str, float] = field(default_factory=dict)
    """Per prediction ("exact", "breaking", "paper"): the largest relative error over all valid groups and steps."""
    n_groups: dict[str, int] = field(default_factory=dict)


# ---- building blocks ------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device", "use auto, cpu, cuda or cuda:N") from exc


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """A stock torch.optim optimizer from `cfg.optimizer` (no wrapper, no fork: the tracker uses its hooks)."""
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, dampening=o.dampening,
                               nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(params, lr=o.lr, alpha=o.alpha, eps=o.eps, momentum=o.momentum,
                               weight_decay=o.weight_decay)


def _dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _batches(loader: Any, start_micro: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches, starting at micro-batch `start_micro` of the deterministic epoch sequence."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetInfo, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a whole split, in eval mode (mode restored afterwards)."""
    was_training = model.training
    model.eval()
    loader = make_loader(data, batch_size, shuffle=False)
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def max_relative_errors(run_dir: Path) -> dict[str, float]:
    """Largest relative error of each prediction over all valid groups and logged steps of a run.

    Relative error: |pred - measured| / norm, with the tracker's per-group `norm` column (|theta_A|^2 for
    scale, |theta_A1|^2 + |theta_A2|^2 for rescale, sum |theta| over the group for translation).
    """
    from neural_mechanics.tracking.store import open_run

    df = open_run(run_dir).frame()
    if df.empty:
        return {}
    df = df[df["valid"]] if "valid" in df else df
    norm = df["norm"].clip(lower=1e-300) if "norm" in df else df["measured"].abs().clip(lower=1e-12)
    out: dict[str, float] = {}
    for name, col in (("exact", "predicted_exact"), ("breaking", "predicted_breaking"), ("paper", "predicted_paper")):
        if col in df:
            rel = ((df[col] - df["measured"]).abs() / norm).dropna()
            if len(rel):
                out[name] = float(rel.max())
    return out


# ---- the run --------------------------------------------------------------------------------------


def run_training(cfg: TrainConfig, *, run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                 console: Any = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train `cfg` with the tracker attached; return where the run is and its final numbers.

    run_dir overrides `cfg.run_dir`. resume=True continues from `run_dir/checkpoint.pt`. stop_after
    (tests, crash drills) stops after that many optimizer steps in this call, as if killed after a checkpoint.
    """
    from neural_mechanics.symmetry.detect import find_symmetries
    from neural_mechanics.tracking.tracker import Tracker

    rank, world = _dist_info()
    device = pick_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        _init_distributed(device)
    out_dir = Path(run_dir if run_dir is not None else cfg.resolved_run_dir)
    ckpt_path = out_dir / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise RunStoreError(f"cannot resume: {ckpt_path} does not exist",
                            "run without --resume to start afresh, or set checkpoint_every > 0 so runs can resume")
    if not resume and (out_dir / "manifest.json").exists():
        raise RunStoreError(f"{out_dir} already holds a run",
                            "pass --resume to continue it, or choose another --run-dir (nothing was overwritten)")

    torch.manual_seed(cfg.seed)
    train_data = load_dataset(cfg.dataset.name, cfg.dataset.root, split="train", augment=cfg.dataset.augment,
                              seed=cfg.seed)
    eval_data = load_dataset(cfg.dataset.name, cfg.dataset.root, split=cfg.dataset.eval_split, seed=cfg.seed)
    resolved = resolve_model(cfg.model, num_classes=cfg.num_classes or train_data.num_classes)
    model = resolved.model.to(device).train()
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

    # Symmetries come from the unwrapped model on one real batch (train mode: BatchNorm has batch statistics).
    x0, _ = next(iter(make_loader(train_data, max(2, min(cfg.batch_size, 16)), seed=cfg.seed)))
    symmetries = find_symmetries(model, x0.to(device))
    if set(cfg.tracker.kinds) != {"translation", "scale", "rescale"}:
        symmetries = symmetries.__class__([s for s in symmetries if s.kind in cfg.tracker.kinds], symmetries.meta)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_multiplier(cfg.schedule, k, total_steps, steps_per_epoch))
    tracker = None
    if cfg.tracker.enabled and len(symmetries):
        tracker = Tracker(net, optimizer, symmetries, out_dir if rank == 0 else None,
                          log_every=cfg.tracker.log_every, log_spaced=cfg.tracker.log_spaced,
                          config=config_to_dict(cfg), rank=rank)
    elif rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    step = 0
    if resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if tracker is not None and state.get("tracker") is not None:
            tracker.load_state_dict(state["tracker"])
        _set_rng_state(state["rng"])
        step = int(state["step"])

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    batches = _batches(loader, step * micro_per_step)

    def checkpoint() -> None:
        if rank != 0:
            return
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "tracker": None if tracker is None else tracker.state_dict(),
                      "rng": _rng_state(), "step": step, "config": config_to_dict(cfg)}, ckpt_path)

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
                   TextColumn("{task.fields[rate]:.1f} steps/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=console, disable=not progress or rank != 0, transient=False)
    started, steps_this_call = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    status, note = "finished", None
    try:
        with bar:
            task = bar.add_task(cfg.name, total=total_steps, completed=step, loss=float("nan"), acc=float("nan"),
                                rate=0.0)
            while step < total_steps:
                if stop_after is not None and steps_this_call >= stop_after:
                    status, note = "running", f"stopped after {steps_this_call} steps (stop_after)"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss_sum, correct, seen = 0.0, 0, 0
                for _ in range(micro_per_step):
                    x, y = next(batches)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        out = net(x)
                        loss = F.cross_entropy(out.float(), y) / micro_per_step
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    loss_sum += float(loss.detach()) * micro_per_step
                    correct += int((out.detach().argmax(1) == y).sum())
                    seen += len(y)
                train_loss = loss_sum / micro_per_step
                if not math.isfinite(train_loss):
                    raise NMechError(f"the training loss became {train_loss} at step {step}",
                                     "lower optimizer.lr, set grad_clip, or use precision fp32; rows logged "
                                     "so far are kept in the run directory")
                if cfg.grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                step += 1
                steps_this_call += 1
                acc = correct / max(seen, 1)
                metrics.update({"train_loss": train_loss, "train_accuracy": acc})
                if tracker is not None and (step % cfg.tracker.log_every == 0 or step == total_steps):
                    tracker.log_metrics(step, "train", loss=train_loss, accuracy=acc,
                                        lr=optimizer.param_groups[0]["lr"])
                if cfg.eval_every and (step % cfg.eval_every == 0) and step < total_steps:
                    ev = evaluate(model, eval_data, device)
                    metrics.update({f"eval_{k}": v for k, v in ev.items()})
                    if tracker is not None:
                        tracker.log_metrics(step, cfg.dataset.eval_split, **ev)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
                elapsed = time.perf_counter() - started
                bar.update(task, completed=step, loss=train_loss, acc=acc, rate=steps_this_call / max(elapsed, 1e-9))
        if status == "finished":
            ev = evaluate(model, eval_data, device)
            metrics.update({f"eval_{k}": v for k, v in ev.items()})
            if tracker is not None:
                tracker.log_metrics(step, cfg.dataset.eval_split, **ev)
        if cfg.checkpoint_every or status != "finished":
            checkpoint()
    except BaseException as exc:
        if tracker is not None:
            tracker.close("failed", f"{type(exc).__name__}: {exc} at step {step}")
        raise
    if tracker is not None:
        tracker.close(status, note)
    result = TrainResult(run_dir=out_dir, steps=step, metrics=metrics, n_groups=symmetries.counts())
    if tracker is not None and rank == 0 and status == "finished":
        result.max_rel_error = max_relative_errors(out_dir)
    return result
