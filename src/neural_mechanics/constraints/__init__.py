"""Geometric constraints that symmetry puts on gradients and Hessians, checked numerically.

Every symmetry psi(theta, alpha) with generator xi(theta) forces, at every theta and for every
minibatch (docs/theory.md section 1):

    gradient constraint   <g, xi(theta)> = 0
    Hessian constraint    r = H xi + J^T g = 0,   J = d xi / d theta

translation: xi = 1_A, J = 0; scale: xi = theta_A, J^T g = g_A; rescale: xi = theta_A1 - theta_A2,
J^T g = g_A1 - g_A2. With the signed mask D of a group (+1 on A / A1, -1 on A2) this is
xi = D * theta and J^T g = D * g for the quadratic kinds.

Why this package exists: a detected group is only a claim. Checking the constraints on a real batch,
next to the same statistic for a random direction on the same coordinates, shows that the claim
holds to rounding (float64: ~1e-15 relative) while a generic direction gives O(1e-2 .. 1). It also
exposes what breaks a symmetry (eval-mode BatchNorm, the BatchNorm eps, a loss without softmax).

It sits above `symmetry/` (it reads groups, the group incidence kernel, the working copy and the loss
specification from there) and below `tracking/`. Modules:

* check.py: `check_constraints`, the gradient constraints of every group (exact, vectorised) and the
  Hessian constraints through random-sign probes with bisection;
* hessian.py: the gradient, reusable Hessian-vector products (torch.func) and the signed probes;
* report.py: `ConstraintReport` / `GroupConstraint`, the residuals next to their random baselines.

Design, for models with thousands of groups (vgg16_bn): groups are compiled once into a
`GroupIncidence` (symmetry/incidence.py, shared with certification and the tracker), so every per-group
reduction sum_{A_i} D_i f is one reduction per (parameter, key) plus one `index_add_`, and every
combination sum_i c_i D_i is one `index_add_` plus a broadcast; no Python loop over groups and no dense
mask per group.
"""

from neural_mechanics.constraints.check import check_constraints
from neural_mechanics.constraints.report import GRAD_FLOOR, ConstraintReport, GroupConstraint

__all__ = ["GRAD_FLOOR", "ConstraintReport", "GroupConstraint", "check_constraints"]
