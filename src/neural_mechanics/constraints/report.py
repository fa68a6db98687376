"""What `check_constraints` returns: per-group gradient and Hessian residuals next to their random baselines."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

GRAD_FLOOR = 1e-6
"""A group's gradient norm below GRAD_FLOOR x (the rms gradient entry) x sqrt(group size) counts as vanished."""


@dataclass
class GroupConstraint:
    """Constraint residuals of one group (float64; NaN where not computed).

    grad_cos = <g_A, xi_A> / (max(|g_A|, floor_A) |xi_A|); grad_rel = |grad_cos|; grad_rel_random is the
    same statistic with a Gaussian vector on A in place of xi. floor_A = GRAD_FLOOR * rms(g) * sqrt(|A|)
    (rms over every parameter the groups touch): a group whose gradient vanishes to rounding (an attention
    key bias, a dead channel) would otherwise get a cosine of pure noise, +-1 for a one-element group.
    hess_rel = |r| / (|H u| + |J^T g|) with r = H xi + J^T g and u a Gaussian direction on A with
    |u| = |xi|; hess_rel_random = |H u + J^T g| / (|H u| + |J^T g|). hess_exact says whether these
    come from this group's own HVPs (True) or are the bound of a probed block (False, see
    `check_constraints`). hess_r, hess_Hxi, hess_Jg, hess_Hu are the underlying norms.
    """

    name: str
    kind: str
    layer: str
    grad_cos: float
    grad_rel: float
    grad_rel_random: float
    hess_rel: float = math.nan
    hess_rel_random: float = math.nan
    hess_exact: bool = False
    hess_block: int = 0
    hess_r: float = math.nan
    hess_Hxi: float = math.nan
    hess_Jg: float = math.nan
    hess_Hu: float = math.nan


@dataclass
class ConstraintReport:
    """Per-group gradient and Hessian constraint residuals with their random baselines."""

    groups: list[GroupConstraint]
    notes: list[str] = field(default_factory=list)
    n_hvps: int = 0
    loss: float = math.nan
    hessian: bool = True

    def to_frame(self) -> Any:
        """One row per group (pandas DataFrame)."""
        cols = list(GroupConstraint.__dataclass_fields__)
        return pd.DataFrame([asdict(g) for g in self.groups], columns=cols)

    def violations(self, grad_tol: float = 1e-6, hess_tol: float = 1e-4) -> list[GroupConstraint]:
        """Groups whose gradient residual exceeds grad_tol or whose Hessian residual exceeds hess_tol."""
        bad = []
        for g in self.groups:
            grad_bad = not g.grad_rel <= grad_tol
            hess_bad = self.hessian and not g.hess_rel <= hess_tol
            if grad_bad or hess_bad:
                bad.append(g)
        return bad

    def ok(self, grad_tol: float = 1e-6, hess_tol: float = 1e-4) -> bool:
        """True when every group meets both constraints within tolerance."""
        return not self.violations(grad_tol, hess_tol)

    def summary(self, grad_tol: float = 1e-6, hess_tol: float = 1e-4) -> str:
        """Per layer and kind: worst residuals next to the median random baseline."""
        df = self.to_frame()
        lines = [f"constraint check: {len(self.groups)} groups, loss {self.loss:.6g}, "
                 f"{self.n_hvps} Hessian-vector products"]
        if len(df):
            agg = df.groupby(["layer", "kind"], sort=False).agg(
                groups=("name", "size"),
                grad_max=("grad_rel", "max"),
                grad_random_median=("grad_rel_random", "median"),
                hess_max=("hess_rel", "max"),
                hess_random_median=("hess_rel_random", "median"),
            )
            lines.append(f"{'layer':<32} {'kind':<11} {'groups':>6} {'grad max':>10} {'grad rand':>10}"
                         f" {'hess max':>10} {'hess rand':>10}")
            for (layer, kind), row in agg.iterrows():
                lines.append(f"{layer!s:<32} {kind:<11} {int(row['groups']):>6} {row['grad_max']:>10.2e}"
                             f" {row['grad_random_median']:>10.2e} {row['hess_max']:>10.2e}"
                             f" {row['hess_random_median']:>10.2e}")
        bad = self.violations(grad_tol, hess_tol)
        if bad:
            lines.append(f"{len(bad)} group(s) violate the constraints (grad_tol {grad_tol:g}, hess_tol {hess_tol:g}):")
            lines += [f"  {g.kind} {g.name}: grad_rel {g.grad_rel:.2e}, hess_rel {g.hess_rel:.2e}" for g in bad[:10]]
            if len(bad) > 10:
                lines.append(f"  ... and {len(bad) - 10} more")
        else:
            lines.append(f"all constraints hold (grad_tol {grad_tol:g}, hess_tol {hess_tol:g})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
