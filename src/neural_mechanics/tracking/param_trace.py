"""Traces of single parameters, for the paper's Fig. 1 (noisy per-parameter vs smooth per-filter dynamics).

The run store keeps per-group charges, not individual weights. `ParamTrace` samples a handful of
single coordinates theta_i in every layer that has a scale group (the layers of Fig. 1) and records
them after every `every`-th optimizer step through the optimizer's step post hook. The samples stay
on the parameters' device until `frame()` is called, so recording costs one small gather per layer
and no host synchronisation. `save(run_dir)` writes `param_trace.parquet` atomically beside the run,
where the report picks it up.

Sharded parameters (FSDP2 DTensors, sharded by rows): the coordinates are drawn among the entries this rank
holds (its block is a contiguous run of the flattened parameter, named by their global flat index), so the
writing rank records its own entries without a collective; parameters sharded along another dim are skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.tracking.shard_tables import local, shard_box
from neural_mechanics.tracking.store import atomic_write_table


class ParamTrace:
    """Record `per_layer` randomly chosen coordinates of each scale-group layer's weight every `every` steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, symmetries: Iterable[Symmetry], *,
                 every: int = 10, per_layer: int = 8, seed: int = 0, start_step: int = 0,
                 previous: pd.DataFrame | None = None):
        """start_step: the optimizer step count at attach time (resumed runs); previous: rows recorded before
        (e.g. the saved `param_trace.parquet` of a resumed run), kept for steps < start_step."""
        if every < 1 or per_layer < 1:
            raise ValueError(f"every and per_layer must be >= 1 (got {every}, {per_layer})")
        params = dict(model.named_parameters())
        gen = torch.Generator().manual_seed(seed)
        self._targets: list[tuple[str, str, Tensor, Tensor, int]] = []
        """(layer, param name, parameter, flat indices into this rank's block, the block's global flat offset)"""
        seen: set[str] = set()
        for s in symmetries:
            if s.kind != "scale":
                continue
            name = s.members[0].param
            name = name if name in params else f"module.{name}"
            if name in seen or name not in params:
                continue
            seen.add(name)
            p = params[name]
            start = _flat_start(name, p)
            held = local(p).numel()
            if start is None or held == 0:
                continue
            idx = torch.randperm(held, generator=gen)[: min(per_layer, held)]
            self._targets.append((s.layer, s.members[0].param, p, idx.to(p.device), start))
        self.every = every
        self.step = int(start_step)
        self._previous = previous[previous["step"] < self.step] if previous is not None else None
        self._records: list[tuple[int, list[Tensor]]] = []
        if self.step % every == 0:
            self._record()
        self._handle = optimizer.register_step_post_hook(self._after_step)

    @torch.no_grad()
    def _record(self) -> None:
        self._records.append((self.step, [local(p.detach()).reshape(-1)[idx].clone()
                                          for _, _, p, idx, _ in self._targets]))

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self._record()

    def close(self) -> None:
        """Detach the hook (recorded samples are kept)."""
        self._handle.remove()

    def frame(self) -> pd.DataFrame:
        """Long form: step, layer, param ("name[i]"), value."""
        rows: dict[str, list[Any]] = {"step": [], "layer": [], "param": [], "value": []}
        for step, values in self._records:
            for (layer, name, _, idx, start), vals in zip(self._targets, values, strict=True):
                for i, v in zip((idx + start).tolist(), vals.double().cpu().tolist(), strict=True):
                    rows["step"].append(step)
                    rows["layer"].append(layer)
                    rows["param"].append(f"{name}[{i}]")
                    rows["value"].append(v)
        frame = pd.DataFrame(rows)
        if self._previous is not None and len(self._previous):
            frame = pd.concat([self._previous[list(rows)], frame], ignore_index=True)
        return frame

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write `param_trace.parquet` into run_dir atomically (temp file + rename)."""
        path = Path(run_dir) / "param_trace.parquet"
        atomic_write_table(path, pa.Table.from_pandas(self.frame(), preserve_index=False))
        return path


def _flat_start(name: str, p: Tensor) -> int | None:
    """Global flat index of the first entry this rank holds of `p`, if its block is one contiguous run of the
    flattened parameter (whole, or sharded along dim 0 only); None otherwise."""
    box = shard_box(name, p)
    if not box.counts or any(o != 0 for o in box.offset[1:]) or tuple(box.shape[1:]) != tuple(p.shape[1:]):
        return None
    return box.offset[0] * math.prod(p.shape[1:]) if p.ndim else 0
