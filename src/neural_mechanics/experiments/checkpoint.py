"""Checkpoints: what one holds, how it is written and read, and when a resume may use it.

`checkpoint.pt` holds model, optimizer, scheduler, grad scaler, tracker state, every rank's RNG state, the
step, the config and the metric rows logged at that step. It is written atomically (temp file, fsync,
rename: a reader sees the old or the new file) and read only with `torch.load(weights_only=True)`, so a
checkpoint never runs code. A resume refuses a checkpoint whose config differs from the current one in a key
that changes the trajectory (`config_mismatch`), or that does not fit the model and optimizer.

A sharded model's checkpoint is a directory (`experiments.fsdp.ShardedCheckpointer`): the model and optimizer
shards through torch.distributed.checkpoint, everything else as here in its `state.pt`; `load_checkpoint` reads
either kind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_mechanics.errors import RunStoreError
from neural_mechanics.experiments.config import TrainConfig, config_to_dict
from neural_mechanics.experiments.distributed import gather_rng_states, rng_state, set_rng_state
from neural_mechanics.experiments.loop import MetricRows
from neural_mechanics.experiments.rundir import SHARDED_STATE, store_error

CHECKPOINT_FORMAT = 2
#: Config keys that may change between a checkpoint and its resume (they do not change the trajectory).
RESUME_FREE_KEYS = frozenset({"run_dir", "device", "description", "eval_every", "checkpoint_every",
                              "dataset.root", "dataset.num_workers"})


def atomic_save(obj: Any, path: Path) -> None:
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
    """Read a checkpoint with `torch.load(weights_only=True)` (never unpickles code); RunStoreError if unusable.

    A sharded checkpoint directory: its `state.pt`, with "sharded_dir" (the directory, where the model and optimizer
    shards are) added.
    """
    sharded = path.is_dir()
    try:
        state = torch.load(path / SHARDED_STATE if sharded else path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise RunStoreError(f"checkpoint {path} does not exist", "run without --resume to start afresh") from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunStoreError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {first}",
                            "it is truncated, corrupt or holds code objects; delete it to restart the run from "
                            "step 0 with --resume (stored rows are then rewritten), or restore it from a backup"
                            ) from exc
    need = {"sharded", "step"} if sharded else {"model", "optimizer", "step"}
    if not isinstance(state, dict) or not need <= set(state):
        raise RunStoreError(f"{path} is not a neural-mechanics training checkpoint",
                            "point --run-dir at a directory written by `nmech train`")
    if sharded:
        state["sharded_dir"] = str(path)
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
    do not change the trajectory (`RESUME_FREE_KEYS`). A key the checkpoint's config lacks (it was written before
    the key existed) counts as its default, which by the config's rule means what the older version did."""
    defaults = _flatten(config_to_dict(TrainConfig(steps=1)))
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b)
                  if k not in RESUME_FREE_KEYS and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


@dataclass
class Checkpointer:
    """The stateful parts of a run, saved together into `path` and restored together from a checkpoint.

    tracker, writer (the run store's RunWriter), trace (the ParamTrace) and scaler may be None. Saving is a
    collective under DDP (every rank's RNG state is gathered), so every rank calls `save` at the same step;
    rank 0 alone writes the file, then flushes the writer's buffered rows and the trace.
    """

    path: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    tracker: Any
    writer: Any
    trace: Any
    metrics: MetricRows
    config: dict[str, Any]
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint lives in."""
        return self.path.parent

    def save(self, step: int) -> None:
        """Write the checkpoint of optimizer step `step` (atomically), then flush what the run has buffered."""
        rng_ranks = gather_rng_states(self.world, self.device)  # collective: before rank 0 alone goes on
        if self.rank != 0:
            return
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     **self.run_state(step, rng_ranks)}, self.path)
        self.after_save()

    def run_state(self, step: int, rng_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything a checkpoint holds besides the model and the optimizer (rank 0 writes it)."""
        return {"format": CHECKPOINT_FORMAT, "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "tracker": None if self.tracker is None else self.tracker.state_dict(),
                "rng": rng_state(), "rng_ranks": rng_ranks, "step": step, "config": self.config,
                "metrics_at_step": self.metrics.state(step)}

    def after_save(self) -> None:
        """Flush the rows buffered up to the checkpoint and the parameter trace (rank 0)."""
        if self.writer is not None:
            self.writer.flush()
        if self.trace is not None:
            self.trace.save(self.run_dir)

    def load_model_optimizer(self, state: Mapping[str, Any]) -> None:
        """Load the model and optimizer states (RuntimeError, KeyError or ValueError when they do not fit)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def restore(self, state: Mapping[str, Any]) -> int:
        """Load a checkpoint's state into the parts (this rank's RNG stream included); return its step.

        RunStoreError when it does not fit the model/optimizer or lacks the tracker state the run needs. Without
        a tracker the writer drops the rows stored after the checkpoint (a tracker does that itself on load).
        """
        try:
            self.load_model_optimizer(state)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RunStoreError(f"checkpoint {self.path} does not fit this model/optimizer: "
                                f"{str(exc).strip().splitlines()[0]}",
                                "resume with the config the run was started with") from exc
        if self.tracker is not None:
            if state.get("tracker") is None:
                raise RunStoreError(f"checkpoint {self.path} holds no tracker state",
                                    "resume with the config the run was started with (tracker settings included)")
            self.tracker.load_state_dict(state["tracker"])
        elif self.writer is not None:
            self.writer.truncate_from(int(state["step"]))
        ranks = state.get("rng_ranks")
        # a checkpoint written with another world size (or before per-rank states): rank 0's state for all
        if isinstance(ranks, list) and len(ranks) == self.world:
            set_rng_state(ranks[self.rank], self.device)
        else:
            set_rng_state(state["rng"])
        self.metrics.restore(state.get("metrics_at_step") or [])
        return int(state["step"])
