"""FSDP2 in `nmech train` (`--set distributed.strategy=fsdp2`): sharding the model and sharded checkpoints.

Sharding (`shard_model`): `torch.distributed.fsdp.fully_shard` on every direct child that holds parameters, then
on the root, over a 1-D device mesh of all ranks. Every parameter becomes a DTensor sharded on dim 0 (rows, uneven
when the rows are not divisible by the world size); FSDP2 keeps the parameter names, so the symmetries detected
on the whole model before sharding name the sharded parameters. The Tracker then sums per rank over its shards
and all-reduces (`tracking/collective_sums.py`). Buffers are not sharded: BatchNorm keeps per-rank batch statistics
(as under DDP).

Checkpoints (`ShardedCheckpointer`): a directory per checkpoint,

    checkpoint-<step>/             complete, renamed into place when every part is written
        .metadata, __<rank>_0.distcp   model and optimizer shards (torch.distributed.checkpoint), every rank
        state.pt                   rank 0: step, config, scheduler, tracker state, every rank's RNG state, metrics
    .checkpoint-<step>.tmp/        being written (a run killed now leaves it; resume removes it)

The state dicts come from torch.distributed.checkpoint.state_dict (`get_state_dict` / `set_state_dict`: sharded
model and optimizer states), so a checkpoint loads on another world size too (torch.distributed.checkpoint
reshards; the RNG streams then restart from rank 0's, as for DDP). After the rename rank 0 removes the older
checkpoint directories; a kill at any moment leaves at least one complete checkpoint once the first is written,
and a resume continues from the newest (`rundir.latest_checkpoint`).

torch.distributed.fsdp / .checkpoint take ~2 s each to import: this module is imported only by runs that shard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from neural_mechanics.experiments.checkpoint import Checkpointer
from neural_mechanics.experiments.distributed import barrier, gather_rng_states
from neural_mechanics.experiments.rundir import SHARDED_STATE, sharded_checkpoint_name, sharded_checkpoints, store_error

__all__ = ["ShardedCheckpointer", "shard_model", "step_hooks_suspended"]


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard `model` in place with FSDP2 over all `world` ranks (see the module docstring); returns it."""
    mesh = init_device_mesh(device.type, (world,))
    for child in model.children():
        if next(child.parameters(), None) is not None:
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def step_hooks_suspended(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The optimizer's own step hooks detached for the body.

    torch.distributed.checkpoint's state-dict helpers create the state of an optimizer that has none yet (a fresh
    one at resume, plain SGD always) by calling `optimizer.step()` with zero gradients and lr 0. That is no
    training step: the tracker's and the parameter trace's step hooks must not count it.
    """
    pre, post = optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks
    optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = pre, post


def _single() -> bool:
    """No process group (one process): torch.distributed.checkpoint then reads and writes every shard here."""
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _dcp_quiet() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every save/load without a process group that it assumes one process,
    which is what `no_dist=_single()` asked for: silence that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedCheckpointer(Checkpointer):
    """`Checkpointer` for a sharded model: `path` is the run directory, each checkpoint a directory in it.

    Saving and restoring are collectives: every rank calls them at the same step.
    """

    @property
    def run_dir(self) -> Path:
        return self.path

    def _state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        with step_hooks_suspended(self.optimizer):
            return get_state_dict(self.model, self.optimizer)

    def save(self, step: int) -> None:
        """Write `checkpoint-<step>/` (every rank its shards, rank 0 the rest), rename it into place, then flush."""
        rng_ranks = gather_rng_states(self.world, self.device)  # collective
        final = self.path / sharded_checkpoint_name(step)
        tmp = self.path / f".{final.name}.tmp"
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            barrier(self.world)  # the empty directory exists before any rank writes into it
            model_sd, optim_sd = self._state_dicts()
            with _dcp_quiet():
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp,  # collective; fsyncs files
                         no_dist=_single())
            if self.rank != 0:
                return
            state_file = tmp / SHARDED_STATE
            torch.save({"sharded": True, **self.run_state(step, rng_ranks)}, state_file)
            with open(state_file, "rb") as fh:
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            old = self.path / f".{final.name}.old"
            if final.exists():  # the same step saved again (a resumed run ending where it resumed)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.path)
            shutil.rmtree(old, ignore_errors=True)
            for s, older in sharded_checkpoints(self.path):
                if s != step:
                    shutil.rmtree(older, ignore_errors=True)
        except OSError as exc:
            raise store_error(exc, tmp, "writing the sharded checkpoint") from exc
        self.after_save()

    def load_model_optimizer(self, state: Mapping[str, Any]) -> None:
        """Read the shards of `state["sharded_dir"]` into the model and optimizer (resharding if the world size
        changed)."""
        if "sharded_dir" not in state:
            raise KeyError("the checkpoint is not sharded (it was written without distributed.strategy=fsdp2)")
        model_sd, optim_sd = self._state_dicts()
        loaded = {"model": model_sd, "optimizer": optim_sd}
        with _dcp_quiet():
            dcp.load(loaded, checkpoint_id=state["sharded_dir"], no_dist=_single())
        with step_hooks_suspended(self.optimizer):
            set_state_dict(self.model, self.optimizer, model_state_dict=loaded["model"],
                           optim_state_dict=loaded["optimizer"])

