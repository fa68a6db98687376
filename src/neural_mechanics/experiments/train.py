"""The training loop behind `nmech train`: a stock optimizer, the Tracker on its step hooks, checkpoints.

One run = one `TrainConfig`. The loop is deliberately ordinary (the tracker must work on anybody's
loop): zero_grad, `grad_accumulation` micro-batches of cross-entropy backward, optional global-norm
clipping, `optimizer.step()`, `scheduler.step()`. Around it:

- determinism: everything random is seeded from `config.seed`; the data order of epoch e is a pure
  function of (seed, e), so a resumed run sees exactly the batches an uninterrupted run would, and the
  same config run twice writes identical frames (on the same machine and torch build);
- crash safety: checkpoints (`checkpoint.pt`, written atomically - temp file, fsync, rename - and
  loadable with `torch.load(weights_only=True)`, the only way this module loads them) hold model,
  optimizer, scheduler, grad scaler, tracker state, RNG states, the step and the metric rows logged at
  that step. A run killed at any moment (SIGKILL included) leaves a readable run directory (the store
  writes every part and the manifest atomically); `resume=True` continues from the last checkpoint,
  the tracker drops the rows logged after it and re-logs them, so the final rows and predictions equal
  those of an uninterrupted run bit for bit. A run killed before its first checkpoint restarts from
  step 0 on resume (its rows are dropped and re-logged);
- hostile input: a non-finite loss or gradient, an unwritable or full run directory, a corrupt or
  foreign checkpoint, a config that does not match the checkpoint, a model the tracker cannot handle -
  each stops the run with an `NMechError` that says what to do; the run is marked failed and every row
  already flushed stays readable;
- distributed (torchrun, WORLD_SIZE > 1): the model is wrapped in DistributedDataParallel and each rank
  reads a disjoint shard of every global batch (rank r takes every world-th sample of the epoch's
  permutation, so the union of the shards of global batch k is exactly batch k of a single process with
  the global batch size). Every rank builds its own Tracker on the wrapped model; its step hooks fire in
  `optimizer.step()`, i.e. after DDP's gradient all-reduce, so every rank reduces the same synchronised
  gradients and advances identical predictions (checked at the end: `TrainResult.rank_disagreement`,
  also in the manifest). Only rank 0 writes rows, checkpoints and the manifest. Every rank starts from
  the same seed (identical initialisation), then, before the first step, ranks > 0 switch to their own
  random stream (`rank_seed`), so dropout draws independent masks on every rank as one process with the
  global batch would; checkpoints hold every rank's RNG state and a resumed rank continues its own. The
  loss and accuracy are all-reduced before logging and before the finiteness check, so all ranks stop
  together.
  BatchNorm under DDP normalises with per-rank batch statistics: a BN model trained on W ranks is NOT
  the same as one process with the global batch (it is one with W "ghost batches"). Its symmetries are
  still exact (each rank's loss is scale invariant), so the tracker's exact predictions still hold, but
  a bit-for-bit comparison with a single process needs a model without BatchNorm. FSDP-sharded models
  are refused with a TrackerError (see `check_not_sharded` and docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics.errors import CaptureError, ConfigError, NMechError, RunStoreError, TrackerError
from neural_mechanics.experiments.config import TrainConfig, config_to_dict, lr_multiplier
from neural_mechanics.experiments.datasets import DatasetInfo, load_dataset, make_loader
from neural_mechanics.experiments.specs import resolve_model

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
_TABLE_DIRS = ("groups", "layers", "metrics")
# Config keys that may change between a checkpoint and its resume (they do not change the trajectory).
_RESUME_FREE_KEYS = frozenset({"run_dir", "device", "description", "eval_every", "checkpoint_every",
                               "dataset.root", "dataset.num_workers"})


class TrainingDivergedError(NMechError):
    """The loss or the gradients stopped being finite."""


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


def check_not_sharded(model: nn.Module) -> None:
    """Raise TrackerError when `model` is sharded with FSDP (FSDP1 wrapper, FSDP2 `fully_shard`, DTensor params).

    Why refused rather than supported: under FSDP a rank holds only a flat shard of each parameter
    outside forward/backward, so at the optimizer step hooks a symmetry group's slices are spread over
    ranks; the tracker would need a per-group all-reduce of every cell sum, plus shard-aware segment
    tables. docs/distributed.md writes that design down; until it exists, a silent wrong answer is worse
    than no answer.
    """
    sharded = ""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        for name, m in model.named_modules():
            if isinstance(m, FullyShardedDataParallel | FSDPModule):
                sharded = f"module {name or '(root)'!r} is {type(m).__name__}"
                break
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    if not sharded:
        try:
            from torch.distributed.tensor import DTensor

            for name, p in model.named_parameters():
                if isinstance(p, DTensor):
                    sharded = f"parameter {name!r} is a DTensor (sharded)"
                    break
        except ImportError:  # pragma: no cover
            pass
    if sharded:
        raise TrackerError(f"the model is sharded with FSDP ({sharded}); the tracker needs whole parameters at "
                           "the optimizer step",
                           "train with DistributedDataParallel instead (`torchrun ... nmech train`), or set "
                           "tracker.enabled=false; docs/distributed.md explains why FSDP is not tracked yet")


def _dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(device: torch.device) -> bool:
    """Initialise the default process group if needed; True when this call created it (so it must destroy it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """Sum floats over ranks (identity on one process)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _rank_disagreement(state: Mapping[str, Any], device: torch.device) -> float:
    """max over every float entry of the tracker state of (max - min over ranks); NaN entries must be NaN everywhere.

    One all-reduce of MAX over the concatenation [v, -v, isnan(v)]: max - min = max(v) + max(-v).
    `norm_max` (the running maximum behind the relative-error floor) is logging bookkeeping that only the
    writing rank keeps, so it is left out.
    """
    import torch.distributed as dist

    flat: list[torch.Tensor] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                flat.append(obj.detach().reshape(-1).to(torch.float64).cpu())
        elif isinstance(obj, Mapping):
            for k in sorted(obj, key=str):
                if k != "norm_max":
                    collect(obj[k])
        elif isinstance(obj, list | tuple):
            for v in obj:
                collect(v)

    collect(state)
    v = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.float64)
    nan = torch.isnan(v)
    v0 = torch.where(nan, torch.zeros_like(v), v)
    n = torch.tensor([float(len(v))], dtype=torch.float64)
    n_max = torch.cat([n, -n]).to(device)
    dist.all_reduce(n_max, op=dist.ReduceOp.MAX)
    if float(n_max[0]) != -float(n_max[1]):
        return math.inf  # ranks hold differently shaped states
    both = torch.cat([v0, -v0, nan.to(torch.float64), -nan.to(torch.float64)]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    k = len(v)
    spread = (both[:k] + both[k:2 * k]).max().item()
    nan_mismatch = bool(((both[2 * k:3 * k] + both[3 * k:]) > 0).any())
    return math.inf if nan_mismatch else float(spread)


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
def evaluate(model: nn.Module, data: DatasetInfo, device: torch.device, batch_size: int = 512, *,
             rank: int = 0, world: int = 1) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a whole split, in eval mode (mode restored afterwards).

    Under DDP (world > 1) rank r evaluates samples r, r + world, ... (each sample exactly once, no padding) and
    the sums (loss, correct, count) are all-reduced, so every rank returns the whole split's numbers.
    """
    was_training = model.training
    model.eval()
    dataset = data.dataset
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    loader = make_loader(dataset, batch_size, shuffle=False)
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    loss_sum, correct_f, total_f = _all_reduce_sum([loss_sum, float(correct), float(total)], device, world)
    return {"loss": loss_sum / max(total_f, 1.0), "accuracy": correct_f / max(total_f, 1.0)}


# ---- run directory and checkpoints -----------------------------------------------------------------


def store_error(exc: OSError | RuntimeError, path: Path, doing: str) -> RunStoreError:
    """An OSError (or torch's RuntimeError wrapping one) while writing the run, as a RunStoreError saying what to do."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        return RunStoreError(f"the disk holding {path} is full (while {doing}): {exc}",
                             "free disk space or choose another --run-dir, then run again with --resume; every "
                             "row flushed before this point is intact")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text:
        return RunStoreError(f"{path} is not writable (while {doing}): {exc}",
                             "make the run directory writable or choose another --run-dir; nothing in it was "
                             "changed")
    return RunStoreError(f"could not write {path} (while {doing}): {exc}",
                         "check the file system and the run directory, then run again with --resume")


def probe_writable(path: Path) -> None:
    """Create and delete a temp file in `path` (created if missing); RunStoreError if the directory is not writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".nmech-write-probe-{os.getpid()}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise store_error(exc, path, "checking that the run directory is writable") from exc


def _manifest_status(path: Path) -> str | None:
    """The `status` of the run in `path` (None when there is no readable manifest)."""
    try:
        return str(json.loads((path / "manifest.json").read_text()).get("status"))
    except (OSError, ValueError, AttributeError):
        return None


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _has_run(path: Path) -> bool:
    """True when `path` holds (part of) a run: a manifest, a checkpoint, or a stored table part."""
    if (path / "manifest.json").exists() or (path / CHECKPOINT).exists():
        return True
    return any(any(p.name.startswith("part-") for p in (path / t).iterdir())
               for t in _TABLE_DIRS if (path / t).is_dir())


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, fsync, rename: a reader sees the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise store_error(exc, path, "writing the checkpoint") from exc


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)` (never unpickles code); RunStoreError if unusable."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise RunStoreError(f"checkpoint {path} does not exist", "run without --resume to start afresh") from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunStoreError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {first}",
                            "it is truncated, corrupt or holds code objects; delete it to restart the run from "
                            "step 0 with --resume (stored rows are then rewritten), or restore it from a backup"
                            ) from exc
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise RunStoreError(f"{path} is not a neural-mechanics training checkpoint",
                            "point --run-dir at a directory written by `nmech train`")
    return state


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ between a checkpoint's config and the current one, ignoring the keys that
    do not change the trajectory (`_RESUME_FREE_KEYS`)."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if k not in _RESUME_FREE_KEYS and a.get(k) != b.get(k))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_seed(seed: int, rank: int) -> int:
    """The random stream of rank > 0 in a distributed run: a 63-bit seed from numpy's SeedSequence([seed, rank])
    (rank 0 keeps `seed`'s stream, so a single process and rank 0 draw alike)."""
    import numpy as np

    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(2, np.uint64)[0] >> 1)


def _gather_rng_states(world: int, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's `_rng_state()`, in rank order (a collective: all ranks call it at the same point).

    The states are fixed-size uint8 tensors, so one tensor all_gather each (on `device`, the backend's device):
    the CPU generator's as "torch" and, on CUDA, the state of the rank's own device as "cuda_own".
    """
    if world == 1:
        return [_rng_state()]
    import torch.distributed as dist

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t, device=device) for _ in range(world)]
        dist.all_gather(out, t.to(device))
        return [o.cpu() for o in out]

    cpu = gather(torch.get_rng_state())
    states: list[dict[str, Any]] = [{"torch": c} for c in cpu]
    if device.type == "cuda":
        for st, c in zip(states, gather(torch.cuda.get_rng_state(device)), strict=True):
            st["cuda_own"] = c
    return states


def _set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda_own" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_own"], device)
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def max_relative_errors(run_dir: Path) -> dict[str, float]:
    """Largest relative error of each prediction ("exact", "breaking", "paper") over all valid groups and steps,
    with the tracker's definition (`tracking.metrics.relative_errors`: |pred - measured| / max(norm, 1e-6 x the
    group's largest norm so far))."""
    from neural_mechanics.tracking.metrics import relative_errors
    from neural_mechanics.tracking.store import open_run

    df = open_run(run_dir).frame()
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


class _Metrics:
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
        return [list(r) for r in self.rows] if step == self.step else []

    def restore(self, rows: list[list[Any]]) -> None:
        for step, split, name, value in rows:
            self.log(int(step), str(split), **{str(name): float(value)})


# ---- the run --------------------------------------------------------------------------------------


def run_training(cfg: TrainConfig, *, run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                 console: Any = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train `cfg` with the tracker attached; return where the run is and its final numbers.

    run_dir overrides `cfg.run_dir`. resume=True continues from `run_dir/checkpoint.pt` (or restarts a run that
    died before its first checkpoint from step 0). stop_after (tests, crash drills) stops after that many
    optimizer steps in this call, as if killed right after a checkpoint (one is written).
    """
    rank, world = _dist_info()
    device = pick_device(cfg.device)
    owns_pg = False
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns_pg = _init_distributed(device)
    finished = False
    try:
        result = _run(cfg, Path(run_dir if run_dir is not None else cfg.resolved_run_dir), resume, console, progress,
                      stop_after, rank, world, device)
        finished = True
        return result
    finally:
        if owns_pg:
            import gc

            import torch.distributed as dist

            # DDP's reducer sits in reference cycles that hold the process group: collect them now, while the
            # interpreter is whole, not at exit (a gloo group destroyed during finalisation aborts the process),
            # and let no rank tear its connections down while another still talks.
            gc.collect()
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _run(cfg: TrainConfig, out_dir: Path, resume: bool, console: Any, progress: bool, stop_after: int | None,
         rank: int, world: int, device: torch.device) -> TrainResult:
    from neural_mechanics.tracking.store import RunWriter
    from neural_mechanics.tracking.tracker import Tracker

    # -- the run directory: refuse to mix runs, check writability before any work -------------------
    ckpt_path = out_dir / CHECKPOINT
    restart_note = None
    if resume and not ckpt_path.is_file():
        if not out_dir.is_dir():
            raise RunStoreError(f"cannot resume: {out_dir} does not exist",
                                "check --run-dir, or run without --resume to start a new run")
        if _manifest_status(out_dir) == "finished":
            raise RunStoreError(f"the run in {out_dir} has finished and kept no checkpoint, so there is nothing to "
                                "resume", "start a new run in another --run-dir (set checkpoint_every > 0 to make "
                                "runs resumable)")
        restart_note = "resumed without a checkpoint (killed before the first one): restarted from step 0"
    if not resume and out_dir.is_dir() and _has_run(out_dir):
        raise RunStoreError(f"{out_dir} already holds a run",
                            "pass --resume to continue it, or choose another --run-dir (nothing was overwritten)")
    if rank == 0:
        probe_writable(out_dir)
        for stale in out_dir.glob(f".{CHECKPOINT}.tmp-*"):  # left by a run killed while checkpointing
            stale.unlink(missing_ok=True)
    _barrier(world)  # every rank has inspected the run directory before rank 0 writes to it
    state: dict[str, Any] | None = None
    if resume and restart_note is None:
        state = load_checkpoint(ckpt_path, device)
        if state.get("config") is not None:
            diff = config_mismatch(state["config"], config_to_dict(cfg))
            if diff:
                raise ConfigError(f"the config differs from the one the checkpoint in {out_dir} was written with, "
                                  f"in: {', '.join(diff)}",
                                  "resume with the run's own config (manifest.json holds it), or start a new run "
                                  "in another --run-dir")

    # -- data, model, symmetries ------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    train_data = load_dataset(cfg.dataset.name, cfg.dataset.root, split="train", augment=cfg.dataset.augment,
                              seed=cfg.seed)
    eval_data = load_dataset(cfg.dataset.name, cfg.dataset.root, split=cfg.dataset.eval_split, seed=cfg.seed)
    resolved = resolve_model(cfg.model, num_classes=cfg.num_classes or train_data.num_classes)
    model = resolved.model.to(device).train()
    if cfg.tracker.enabled:
        check_not_sharded(model)
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

    symmetries = None
    if cfg.tracker.enabled:
        from neural_mechanics.symmetry.detect import find_symmetries

        # From the unwrapped model on one real batch (train mode: BatchNorm has batch statistics).
        x0, _ = next(iter(make_loader(train_data, max(2, min(cfg.batch_size, 16)), seed=cfg.seed)))
        try:
            symmetries = find_symmetries(model, x0.to(device))
        except CaptureError as exc:
            raise CaptureError(f"the tracker cannot analyse model {cfg.model!r}: {exc.what}",
                               f"{exc.fix + '; or ' if exc.fix else ''}train without the tracker: "
                               "--set tracker.enabled=false") from exc
        if set(cfg.tracker.kinds) != {"translation", "scale", "rescale"}:
            symmetries = symmetries.__class__([s for s in symmetries if s.kind in cfg.tracker.kinds],
                                              symmetries.meta)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_multiplier(cfg.schedule, k, total_steps, steps_per_epoch))
    cfg_dict = config_to_dict(cfg)
    tracker: Tracker | None = None
    writer: Any = None
    try:
        if symmetries is not None and len(symmetries):
            tracker = Tracker(net, optimizer, symmetries, out_dir if rank == 0 else None,
                              log_every=cfg.tracker.log_every, log_spaced=cfg.tracker.log_spaced,
                              config=cfg_dict, rank=rank)
            writer = tracker.writer
        elif rank == 0:
            writer = RunWriter(out_dir, config=cfg_dict)
            writer.add_note("no symmetry tracked" if cfg.tracker.enabled else "tracker disabled in the config")
    except OSError as exc:
        raise store_error(exc, out_dir, "creating the run directory") from exc
    metrics_log = _Metrics(writer)
    trace = None
    if tracker is not None and rank == 0:
        from neural_mechanics.tracking.param_trace import ParamTrace

        previous = out_dir / "param_trace.parquet"
        trace = ParamTrace(net, optimizer, symmetries or (), every=cfg.tracker.log_every, seed=cfg.seed,
                           start_step=int(state["step"]) if state is not None else 0,
                           previous=pd.read_parquet(previous) if state is not None and previous.is_file() else None)
        if state is None and symmetries is not None:
            _save_constraints(model, symmetries, train_data, out_dir, cfg.seed, device)

    step = 0
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RunStoreError(f"checkpoint {ckpt_path} does not fit this model/optimizer: "
                                f"{str(exc).strip().splitlines()[0]}",
                                "resume with the config the run was started with") from exc
        if tracker is not None:
            if state.get("tracker") is None:
                raise RunStoreError(f"checkpoint {ckpt_path} holds no tracker state",
                                    "resume with the config the run was started with (tracker settings included)")
            tracker.load_state_dict(state["tracker"])
        elif writer is not None:
            writer.truncate_from(int(state["step"]))
        ranks = state.get("rng_ranks")
        # a checkpoint written with another world size (or before per-rank states): rank 0's state for all
        if isinstance(ranks, list) and len(ranks) == world:
            _set_rng_state(ranks[rank], device)
        else:
            _set_rng_state(state["rng"])
        step = int(state["step"])
        metrics_log.restore(state.get("metrics_at_step") or [])
    elif restart_note is not None and writer is not None:
        dropped = writer.truncate_from(0)
        writer.add_note(f"{restart_note} (dropped {dropped} stored rows)")
        writer.write_manifest()
    if writer is not None and world > 1:
        writer.manifest["distributed"] = {"world_size": world, "backend": "nccl" if device.type == "cuda" else "gloo",
                                          "batchnorm": "per-rank batch statistics (not SyncBatchNorm)"}

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    batches = _batches(loader, step * micro_per_step)

    if state is None and world > 1 and rank > 0:
        torch.manual_seed(rank_seed(cfg.seed, rank))

    def checkpoint() -> None:
        rng_ranks = _gather_rng_states(world, device)  # collective: before rank 0 alone goes on
        if rank != 0:
            return
        _atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(),
                      "scaler": None if scaler is None else scaler.state_dict(),
                      "tracker": None if tracker is None else tracker.state_dict(),
                      "rng": _rng_state(), "rng_ranks": rng_ranks, "step": step, "config": cfg_dict,
                      "metrics_at_step": metrics_log.state(step)}, ckpt_path)
        if writer is not None:
            writer.flush()
        if trace is not None:
            trace.save(out_dir)

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
    disagreement: float | None = None
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
                for micro in range(micro_per_step):
                    x, y = next(batches)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    sync = world == 1 or micro == micro_per_step - 1
                    no_sync = not sync and isinstance(net, nn.parallel.DistributedDataParallel)
                    with net.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                            out = net(x)
                            loss = F.cross_entropy(out.float(), y) / micro_per_step
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    loss_sum += float(loss.detach()) * micro_per_step
                    correct += int((out.detach().argmax(1) == y).sum())
                    seen += len(y)
                loss_sum, correct_f, seen_f = _all_reduce_sum([loss_sum, float(correct), float(seen)], device, world)
                train_loss = loss_sum / (micro_per_step * world)
                if not math.isfinite(train_loss):
                    raise TrainingDivergedError(
                        f"the training loss became {train_loss} at step {step} "
                        f"(lr {optimizer.param_groups[0]['lr']:g})",
                        "lower optimizer.lr, set grad_clip, or use precision fp32; the rows logged so far are kept "
                        "in the run directory (start a new run, --resume would diverge again)")
                if cfg.grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
                if scaler is None and not math.isfinite(float(grad_norm)):
                    raise TrainingDivergedError(
                        f"the gradients became non-finite (global norm {float(grad_norm)}) at step {step} although "
                        f"the loss is {train_loss:g}",
                        "lower optimizer.lr or set grad_clip (clipping cannot repair inf/nan gradients: look for "
                        "an overflow in the model); the rows logged so far are kept in the run directory")
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                step += 1
                steps_this_call += 1
                acc = correct_f / max(seen_f, 1.0)
                metrics.update({"train_loss": train_loss, "train_accuracy": acc})
                if step % cfg.tracker.log_every == 0 or step == total_steps:
                    metrics_log.log(step, "train", loss=train_loss, accuracy=acc,
                                    lr=optimizer.param_groups[0]["lr"])
                if cfg.eval_every and (step % cfg.eval_every == 0) and step < total_steps:
                    ev = evaluate(model, eval_data, device, rank=rank, world=world)
                    metrics.update({f"eval_{k}": v for k, v in ev.items()})
                    metrics_log.log(step, cfg.dataset.eval_split, **ev)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
                elapsed = time.perf_counter() - started
                bar.update(task, completed=step, loss=train_loss, acc=acc, rate=steps_this_call / max(elapsed, 1e-9))
        if status == "finished":
            ev = evaluate(model, eval_data, device, rank=rank, world=world)
            metrics.update({f"eval_{k}": v for k, v in ev.items()})
            metrics_log.log(step, cfg.dataset.eval_split, **ev)
        if tracker is not None and world > 1:
            disagreement = _rank_disagreement(tracker.state_dict(), device)
            if writer is not None:
                writer.manifest["distributed"]["rank_disagreement"] = disagreement
        if cfg.checkpoint_every or status != "finished":
            checkpoint()
    except BaseException as exc:
        err: BaseException = exc
        if isinstance(exc, OSError):
            err = store_error(exc, out_dir, f"training step {step}")
        _close_quietly(tracker, writer, "failed", f"{type(err).__name__}: {err} at step {step}")
        if err is not exc:
            raise err from exc
        raise
    try:
        if trace is not None:
            trace.close()
            trace.save(out_dir)
        _close_run(tracker, writer, status, note)
    except OSError as exc:
        raise store_error(exc, out_dir, "closing the run") from exc
    result = TrainResult(run_dir=out_dir, steps=step, metrics=metrics, status=status, world_size=world,
                         n_groups=symmetries.counts() if symmetries is not None else {},
                         rank_disagreement=disagreement)
    if tracker is not None and rank == 0 and status == "finished":
        result.max_rel_error = max_relative_errors(out_dir)
    return result


#: Above this many parameters the start-of-run constraint check skips the Hessian (HVPs in float64 are slow on CPU).
HESSIAN_CHECK_MAX_PARAMS = 2_000_000


def _save_constraints(model: nn.Module, symmetries: Any, data: DatasetInfo, out_dir: Path, seed: int,
                      device: torch.device) -> None:
    """Check the gradient (and, for small models, Hessian) constraints on one batch at step 0 and save them as
    `constraints.parquet` beside the run, where the report's constraint histograms read them. Best effort: a
    failure here is a warning, never a lost run."""
    from neural_mechanics.geometry import check_constraints

    if not len(symmetries):
        return
    try:
        x, y = next(iter(make_loader(data, 32, seed=seed)))
        n_params = sum(p.numel() for p in model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check_constraints(model, F.cross_entropy, (x.to(device), y.to(device)), symmetries,
                                       hessian=n_params <= HESSIAN_CHECK_MAX_PARAMS, seed=seed)
        from neural_mechanics.tracking.store import atomic_write_table

        atomic_write_table(out_dir / "constraints.parquet",
                           pa.Table.from_pandas(report.to_frame(), preserve_index=False))
    except Exception as exc:  # the check is an extra; training goes on
        warnings.warn(f"could not check the constraints at step 0: {exc}", RuntimeWarning, stacklevel=2)


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
