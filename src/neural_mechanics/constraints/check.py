"""`check_constraints`: every group's gradient and Hessian constraint on one batch, next to a random baseline.

Gradient (every group, exact, fully vectorised through the group incidence): one gradient and a few
per-group reductions. Hessian: HVPs probed many groups at a time (constraints/hessian.py): if every
r_i = 0 then R(s) = sum_i s_i r_i = 0 for every sign vector s; if some r_i != 0, flipping s_i changes R
by 2 r_i, so at most half of all sign draws hide it and n_probes independent draws miss it with
probability <= 2^-n_probes. Moreover E_s |R(s)|^2 = sum_i |r_i|^2 (Hutchinson), so max_k |R(s_k)|
estimates an upper bound on every member's |r_i|. A block whose bound exceeds `hess_tol` is split in two
and each half probed again (bisection) until blocks of at most `n_probes` groups, which are computed
exactly, one HVP pair per group. A model where every constraint holds costs 2 * n_probes HVPs per kind,
whatever the number of groups.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from neural_mechanics.constraints.hessian import Hessian, HessianProbe
from neural_mechanics.constraints.report import GRAD_FLOOR, ConstraintReport, GroupConstraint
from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.symmetry.loss import LossLike, as_loss_spec
from neural_mechanics.symmetry.utils import (
    NEGLIGIBLE_EPS,
    as_args,
    cast_inputs,
    eval_mode_batchnorms,
    fixed_rng,
    model_device,
    working_copy,
)


def check_constraints(
    model: nn.Module,
    loss_fn: LossLike,
    batch: tuple[Any, Any],
    symmetries: Iterable[Symmetry],
    *,
    hessian: bool = True,
    n_probes: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    hess_tol: float = 1e-4,
    hess_mode: Literal["probe", "exact"] = "probe",
    norm_eps: float | None = NEGLIGIBLE_EPS,
) -> ConstraintReport:
    """Gradient and Hessian constraint residuals of every group on one batch, in `dtype`.

    loss_fn: the loss argument of find_symmetries and certify (symmetry/loss.py): a callable
    loss_fn(outputs, targets) -> scalar (e.g. F.cross_entropy; a callable that also accepts one argument
    is called with two here, as always), a callable loss(outputs) -> scalar, "cross_entropy" / "softmax"
    (cross-entropy of the logits over the class axis), "mse", or a LossSpec. batch = (inputs, targets)
    with inputs a tensor or a tuple of positional arguments. Runs on a deep copy (see `working_copy`):
    the model is left exactly as it was. Normalisation eps is set to `norm_eps` on the copy (None keeps
    the real eps).

    Gradient (every group, exact): grad_cos_i = <g, D_i theta> / (|g_A_i| |theta_A_i|) for the
    quadratic kinds, <g, 1_A_i> / (|g_A_i| sqrt|A_i|) for translation; the baseline replaces xi_i by
    a Gaussian vector z on A_i.

    Hessian (hessian=True), with r_i = H xi_i + J_i^T g and u_i Gaussian on A_i, |u_i| = |xi_i|:
      exact group: hess_rel_i = |r_i| / (|H u_i| + |J_i^T g|),
                   hess_rel_random_i = |H u_i + J_i^T g| / (|H u_i| + |J_i^T g|).
      probed block B of n_B groups, K = n_probes sign draws s_k, v_k = sum_i s_ki xi_i,
      w_k = sum_i s_ki u_i, R_k = H v_k + sum_i s_ki J_i^T g = sum_i s_ki r_i:
                   hess_rel_i <= max_k |R_k| / (rms_k |H w_k| / sqrt(n_B) + |J_i^T g|)
      (max_k |R_k| estimates an upper bound on |r_i| since E|R|^2 = sum_i |r_i|^2, and
      rms_k |H w_k| / sqrt(n_B) estimates the RMS over the block of |H u_i|);
                   hess_rel_random_i ~ rms_k |H w_k + J_k^T g| / sqrt(n_B) / (same denominator).
      Blocks start as one per kind; a block whose largest bound exceeds `hess_tol` is bisected,
      and blocks of <= n_probes groups are computed exactly. hess_mode="exact" computes every group
      exactly (2 HVPs per group; the brute-force reference).
    If a BatchNorm is in eval mode a warning is issued (running statistics break scale symmetry).
    """
    syms = list(symmetries)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise NMechError("batch must be a pair (inputs, targets)",
                         "call check_constraints(model, loss_fn, (x, y), symmetries)")
    if n_probes < 1:
        raise NMechError(f"n_probes must be >= 1, got {n_probes}", "use n_probes=8 (the default)")
    spec = as_loss_spec(loss_fn, targets_by_default=True)
    inputs, targets = batch
    notes: list[str] = []
    evals = eval_mode_batchnorms(model)
    if evals:
        msg = (f"BatchNorm module(s) {', '.join(evals[:5])}{' ...' if len(evals) > 5 else ''} are in eval mode: they "
               "normalise with running statistics, which breaks the scale symmetry of the parameters before them "
               "(their scale constraints will fail). Call model.train() before checking constraints.")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    device = model_device(model)
    work, copy_notes = working_copy(model, dtype, norm_eps)
    notes += copy_notes
    args = cast_inputs(as_args(inputs), dtype, device)
    if isinstance(targets, Tensor):
        targets = targets.to(device) if device is not None else targets
        if targets.is_floating_point():
            targets = targets.to(dtype)

    # one dropout mask for the gradient, the HVPs and the loss value; attention through the math kernel, whose
    # backward is differentiable again (the fused CPU/GPU kernels have no double backward, which HVPs need)
    with fixed_rng(seed, device), sdpa_kernel([SDPBackend.MATH]):
        hes = Hessian(work, spec.bind(targets), args, need_hvp=hessian and bool(syms))
    theta = hes.params
    g = hes.grad
    if not syms:
        return ConstraintReport([], notes, 0, hes.loss, hessian)
    inc = GroupIncidence(syms, theta)
    gen = torch.Generator().manual_seed(seed)
    quad = inc.quadratic

    # -- gradient constraints: exact for every group, fully vectorised ---------------------------
    g_theta = {k: g[k] * theta[k] for k in inc.params}
    g_sq = {k: g[k].pow(2) for k in inc.params}
    th_sq = {k: theta[k].pow(2) for k in inc.params}
    dot_q = inc.reduce(g_theta)  # <g, D theta>
    dot_t = inc.reduce(g)  # <g, 1_A> (sign +1 for translation members)
    dot = torch.where(quad, dot_q, dot_t)
    g_norm = inc.reduce(g_sq, signed=False).clamp_min(0).sqrt()
    xi_norm = torch.where(quad, inc.reduce(th_sq, signed=False), inc.sizes()).clamp_min(0).sqrt()
    z = {k: torch.randn(e, generator=gen, dtype=torch.float64).to(inc.device) for k, e in inc.shapes.items()}
    z_norm = inc.reduce({k: t.pow(2) for k, t in z.items()}, signed=False).clamp_min(0).sqrt()
    dot_z = inc.reduce({k: g[k] * z[k] for k in z})
    tiny = torch.finfo(torch.float64).tiny
    n_all = sum(g[k].numel() for k in inc.params)
    rms = math.sqrt(sum(float(g_sq[k].sum()) for k in inc.params) / max(n_all, 1))
    g_den = torch.maximum(g_norm, GRAD_FLOOR * rms * inc.sizes().sqrt())  # see GroupConstraint
    grad_cos = dot / (g_den * xi_norm).clamp_min(tiny)
    grad_rand = dot_z.abs() / (g_den * z_norm).clamp_min(tiny)

    rows = [
        GroupConstraint(name=s.name, kind=s.kind, layer=s.layer, grad_cos=float(grad_cos[i]),
                        grad_rel=float(grad_cos[i].abs()), grad_rel_random=float(grad_rand[i]))
        for i, s in enumerate(syms)
    ]
    if not hessian:
        return ConstraintReport(rows, notes, 0, hes.loss, hessian)

    # -- Hessian constraints ----------------------------------------------------------------------
    jg_norm = torch.where(quad, g_norm, torch.zeros_like(g_norm))  # |J_i^T g| = |D_i g| (0 for translation)
    u_coef = xi_norm / z_norm.clamp_min(tiny)  # u_i = u_coef_i * |D_i| z  (|u_i| = |xi_i|)

    prober = HessianProbe(hes, inc, z, u_coef)
    probe = prober.stats

    def exact(i: int) -> None:
        s = torch.zeros(inc.n, dtype=torch.float64)
        s[i] = 1.0
        st = probe(s)
        den = max(st["Hu"] + st["Jg"], tiny)
        row = rows[i]
        row.hess_rel, row.hess_rel_random = st["r"] / den, st["ru"] / den
        row.hess_exact, row.hess_block = True, 1
        row.hess_r, row.hess_Hxi, row.hess_Jg, row.hess_Hu = st["r"], st["Hxi"], st["Jg"], st["Hu"]

    def resolve(block: list[int]) -> None:
        if hess_mode == "exact" or len(block) <= n_probes:
            for i in block:
                exact(i)
            return
        idx = torch.tensor(block, dtype=torch.long)
        stats = []
        for _ in range(n_probes):
            s = torch.zeros(inc.n, dtype=torch.float64)
            s[idx] = torch.randint(0, 2, (len(block),), generator=gen, dtype=torch.float64) * 2 - 1
            stats.append(probe(s))
        nb = len(block)
        r_max = max(st["r"] for st in stats)
        hu = math.sqrt(sum(st["Hu"] ** 2 for st in stats) / len(stats)) / math.sqrt(nb)
        ru = math.sqrt(sum(st["ru"] ** 2 for st in stats) / len(stats)) / math.sqrt(nb)
        hx = math.sqrt(sum(st["Hxi"] ** 2 for st in stats) / len(stats)) / math.sqrt(nb)
        jg = jg_norm[idx]
        den = (hu + jg).clamp_min(tiny)
        bound = r_max / den
        if float(bound.max()) > hess_tol:
            half = len(block) // 2
            resolve(block[:half])
            resolve(block[half:])
            return
        for j, i in enumerate(block):
            row = rows[i]
            row.hess_rel, row.hess_rel_random = float(bound[j]), float(ru / den[j])
            row.hess_exact, row.hess_block = False, nb
            row.hess_r, row.hess_Hxi, row.hess_Jg, row.hess_Hu = r_max, hx, float(jg[j]), hu

    for kind in KINDS:
        block = [i for i, s in enumerate(syms) if s.kind == kind]
        if block:
            resolve(block)
    notes.append(f"Hessian: {hes.count} HVPs for {len(syms)} groups ({hess_mode} mode, n_probes={n_probes}); "
                 "hess_exact=False rows carry their probed block's bound")
    return ConstraintReport(rows, notes, hes.count, hes.loss, hessian)
