"""Traces of single parameters, for the paper's Fig. 1 (noisy per-parameter vs smooth per-filter dynamics).

The run store keeps per-group charges, not individual weights. `ParamTrace` samples a handful of
single coordinates theta_i in every layer that has a scale group (the layers of Fig. 1) and records
them after every `every`-th optimizer step through the optimizer's step post hook. The samples stay
on the parameters' device until `frame()` is called, so recording costs one small gather per layer
and no host synchronisation. `save(run_dir)` writes `param_trace.parquet` atomically beside the run,
where the report picks it up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Symmetry
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
        self._targets: list[tuple[str, str, Tensor, Tensor]] = []  # (layer, param name, parameter, flat indices)
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
            idx = torch.randperm(p.numel(), generator=gen)[: min(per_layer, p.numel())]
            self._targets.append((s.layer, s.members[0].param, p, idx.to(p.device)))
        self.every = every
        self.step = int(start_step)
        self._previous = previous[previous["step"] < self.step] if previous is not None else None
        self._records: list[tuple[int, list[Tensor]]] = []
        if self.step % every == 0:
            self._record()
        self._handle = optimizer.register_step_post_hook(self._after_step)

    @torch.no_grad()
    def _record(self) -> None:
        self._records.append((self.step, [p.detach().reshape(-1)[idx].clone() for _, _, p, idx in self._targets]))

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
            for (layer, name, _, idx), vals in zip(self._targets, values, strict=True):
                for i, v in zip(idx.tolist(), vals.double().cpu().tolist(), strict=True):
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
