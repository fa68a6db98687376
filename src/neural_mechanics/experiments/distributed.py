"""The processes of a distributed run (torchrun, WORLD_SIZE > 1): the process group, collectives on floats,
and every rank's random stream.

Single-process runs go through the same calls: with world size 1 every collective is the identity and no
process group is created. Every rank starts from the run's seed (identical initialisation); before the first
step, ranks > 0 switch to their own stream (`rank_seed`), so dropout draws independent masks on every rank as
one process with the global batch would. A checkpoint holds every rank's generator state
(`gather_rng_states`), and a resumed rank continues its own (`set_rng_state`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device, world: int) -> torch.device:
    """The device this rank trains on: under DDP on CUDA, cuda:LOCAL_RANK (made the current device); else `device`."""
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def backend(device: torch.device) -> str:
    """The collective backend for `device`: nccl on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device, world: int) -> Iterator[None]:
    """Hold the default process group for the body (world > 1): created here unless one exists (then left alone).

    At exit a group created here is destroyed: first DDP's reference cycles (its reducer holds the group) are
    collected while the interpreter is whole (a gloo group destroyed during finalisation aborts the process), and
    after a body that finished, no rank tears its connections down while another still talks (a barrier).
    """
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend(device))
    finished = False
    try:
        yield
        finished = True
    finally:
        if owns:
            gc.collect()
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every rank (no-op on one process)."""
    if world > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """Sum floats over ranks (identity on one process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def rank_disagreement(state: Mapping[str, Any], device: torch.device) -> float:
    """max over every float entry of the tracker state of (max - min over ranks); NaN entries must be NaN everywhere.

    One all-reduce of MAX over the concatenation [v, -v, isnan(v)]: max - min = max(v) + max(-v).
    `norm_max` (the running maximum behind the relative-error floor) is logging bookkeeping that only the
    writing rank keeps, so it is left out.
    """
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


# -- random streams -----------------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """The random stream of rank > 0 in a distributed run: a 63-bit seed from numpy's SeedSequence([seed, rank])
    (rank 0 keeps `seed`'s stream, so a single process and rank 0 draw alike)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(2, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """This process's generator states: the CPU generator as "torch", every CUDA device's as "cuda"."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(world: int, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order (a collective: all ranks call it at the same point).

    The states are fixed-size uint8 tensors, so one tensor all_gather each (on `device`, the backend's device):
    the CPU generator's as "torch" and, on CUDA, the state of the rank's own device as "cuda_own".
    """
    if world == 1:
        return [rng_state()]

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


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore a state from `rng_state()` or `gather_rng_states()` (its "cuda_own" entry onto `device`)."""
    torch.set_rng_state(state["torch"])
    if "cuda_own" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_own"], device)
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
