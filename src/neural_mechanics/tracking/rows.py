"""Rows of the groups table: built on the device by the strategies, moved to the host once per family and log step.

A row is a mapping column -> float64 tensor [G] for one family. `base_row` fills the columns every strategy
writes the same way (the measured charge, its norm, the gradient norm, the lr, validity) and NaN for the rest;
a strategy then sets what it knows (predictions, breaking, breaking_term, angular_update) by name, so a new
strategy can add a column without touching this module (the run store's schema must list it).

The columns of a row logged at step s (the groups table, `store.GROUP_COLUMNS`):

    measured        the charge at theta_s
    predicted_*     the predictions for step s (NaN where one does not apply, see `theory/applicability.py`)
    breaking        predicted_breaking - predicted_exact: the accumulated effect of symmetry breaking
    breaking_term   B_s = <v, g_s> (SGD) or the optimizer's <v, u_s> (other optimizers), v = D theta_s or 1_A
    lr              the step's learning rate
    norm            the relative error's denominator: |C| (scale), |theta_A1|^2 + |theta_A2|^2 (rescale),
                    sum |theta| (translation)
    grad_norm       |g_A|
    angular_update  the angle between theta_s and theta_{s+1} in radians (scale groups; `theory/identity.py`)
    predicted_equilibrium  the equilibrium |theta_A|^2 the theory predicts (scale groups; NaN where none exists)
    angular_update_eq      the equilibrium angle per step (scale groups)
    relaxation_time        steps for the norm to relax by e under the weight decay (~ 1 / (eta lambda))
    update_ratio           adaptive optimizers: |u_s|^2_A over its noise-dominated value (the regime check)
    valid           the group is inside the theory (its predictions apply)

`RowEmitter` turns the rows of a log step into host frames: one device-to-host transfer for all families (the
log step's one host synchronisation), the group / kind / layer labels, the running max of each group's norm (the
relative-error floor, `tracking/metrics.py`) and
the per-layer aggregates; the tracker hands both to its sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from neural_mechanics.tracking.families import ChargeFamily
from neural_mechanics.tracking.metrics import EQUILIBRIUM_COLUMNS, PREDICTION_COLUMNS, layer_rows

__all__ = ["Row", "RowEmitter", "base_row"]

Row = dict[str, Tensor]


def base_row(family: ChargeFamily, charge: Tensor, norm_sq: Tensor, grad_sq: Tensor | None, lr: Tensor | None,
             valid: Tensor) -> Row:
    """measured = charge, norm = family.norm(charge, norm_sq), grad_norm = sqrt(grad_sq), lr, valid; NaN elsewhere.

    grad_sq / lr None: NaN (a row logged outside a step has no gradient).
    """
    nan = family.nan()
    row: Row = {"measured": charge, **dict.fromkeys(PREDICTION_COLUMNS, nan), "breaking": nan,
                "breaking_term": nan, "lr": nan if lr is None else lr.to(torch.float64).expand(family.n),
                "norm": family.norm(charge, norm_sq), "grad_norm": nan if grad_sq is None else torch.sqrt(grad_sq),
                "angular_update": nan, **dict.fromkeys(EQUILIBRIUM_COLUMNS, nan), "valid": valid.to(torch.float64)}
    return row


class RowEmitter:
    """Host side of logging: rows -> the groups frame of one step and its per-layer aggregates."""

    def __init__(self, families: Sequence[ChargeFamily]):
        self.families = list(families)
        self.norm_max = [np.zeros(f.n, dtype=np.float64) for f in self.families]
        """Per family, the largest |norm| logged so far per group (the relative-error floor)."""

    def frames(self, step: int, rows: Sequence[Row | None]) -> tuple[dict[str, Any], dict[str, list[Any]]] | None:
        """(groups columns, layers columns) of one logged step; None when no family has a row."""
        present = [(i, fam, row) for i, (fam, row) in enumerate(zip(self.families, rows, strict=True))
                   if row is not None]
        if not present:
            return None
        stacked = [torch.stack([row[c].to(torch.float64) for c in row]) for _, _, row in present]
        host = torch.cat([b.reshape(-1) for b in stacked]).cpu().numpy()  # the one transfer
        frames = []
        start = 0
        for (i, fam, row), b in zip(present, stacked, strict=True):
            cols = list(row)
            block = host[start:start + b.numel()].reshape(b.shape)
            start += b.numel()
            data: dict[str, Any] = {c: block[j] for j, c in enumerate(cols)}
            data["valid"] = data["valid"] > 0.5
            self.norm_max[i] = np.fmax(self.norm_max[i], np.abs(data["norm"]))
            data["norm_max"] = self.norm_max[i].copy()
            frames.append(pd.DataFrame({"step": np.full(fam.n, step, dtype=np.int64), "group": fam.names,
                                        "kind": fam.kinds, "layer": fam.layers, **data}))
        df = pd.concat(frames, ignore_index=True)
        return {c: df[c].to_numpy() for c in df.columns if c != "norm_max"}, layer_rows(df)

    def state(self, i: int) -> Tensor:
        return torch.from_numpy(self.norm_max[i].copy())

    def load_state(self, i: int, norm_max: Tensor | None) -> None:
        if norm_max is not None:
            self.norm_max[i] = norm_max.numpy().astype(np.float64).copy()

