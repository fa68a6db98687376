"""Geometric constraints that symmetry puts on gradients and Hessians, checked numerically.

Every symmetry psi(theta, alpha) with generator xi(theta) forces, at every theta and for every
minibatch (docs/theory.md section 1):

    gradient constraint   <g, xi(theta)> = 0
    Hessian constraint    r = H xi + J^T g = 0,   J = d xi / d theta

translation: xi = 1_A, J = 0; scale: xi = theta_A, J^T g = g_A; rescale: xi = theta_A1 - theta_A2,
J^T g = g_A1 - g_A2. With the signed mask D of a group (+1 on A / A1, -1 on A2) this is
xi = D * theta and J^T g = D * g for the quadratic kinds.

Why this module exists: a detected group is only a claim. Checking the constraints on a real batch,
next to the same statistic for a random direction on the same coordinates, shows that the claim
holds to rounding (float64: ~1e-15 relative) while a generic direction gives O(1e-2 .. 1). It also
exposes what breaks a symmetry (eval-mode BatchNorm, the BatchNorm eps, a loss without softmax).

Design, for models with thousands of groups (vgg16_bn):

* Groups are compiled once into a `GroupIncidence` (symmetry/incidence.py, shared with the tracker):
  per parameter and slicing key, a table of cells and (cell, group, sign) triples. Every per-group
  reduction sum_{A_i} D_i f is one reduction per (parameter, key) plus one `index_add_`, and every
  combination sum_i c_i D_i is one `index_add_` plus a broadcast; no Python loop over groups and no
  dense mask per group.
* The gradient constraints of all groups come from one gradient and a few such reductions.
* The Hessian constraints use Hessian-vector products (torch.func: vjp of grad, i.e. reverse over
  reverse; the vjp closure is built once and reused) and are probed many groups at a time. The
  residual is linear in the groups: for signs s_i = +-1 and v = sum_i s_i xi_i,

      R(s) = H v + sum_i s_i J_i^T g = sum_i s_i r_i,

  so one HVP tests a whole block of groups. If every r_i = 0 then R(s) = 0 for every s; if some
  r_i != 0, flipping s_i changes R by 2 r_i, so at most half of all sign draws hide it and n_probes
  independent draws miss it with probability <= 2^-n_probes. Moreover E_s |R(s)|^2 = sum_i |r_i|^2
  (Hutchinson), so max_k |R(s_k)| estimates an upper bound on every member's |r_i|.
  A block's per-group residual is therefore bounded by max_k |R(s_k)| over the member's scale (see
  `check_constraints`); a block whose bound exceeds `hess_tol` is split in two and each half probed
  again (bisection) until blocks of at most `n_probes` groups, which are computed exactly, one HVP
  per group (as cheap as probing them). A model where every constraint holds costs
  2 * n_probes HVPs per kind, whatever the number of groups.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    parameter_dict,
    working_copy,
)

# ---------------------------------------------------------------------------------------------------
# Vector helpers on parameter dicts
# ---------------------------------------------------------------------------------------------------

PDict = dict[str, Tensor]


def _norm(v: Mapping[str, Tensor]) -> float:
    total = sum((t.to(torch.float64).pow(2).sum() for t in v.values()), torch.zeros((), dtype=torch.float64))
    return float(torch.as_tensor(total).sqrt())


def _axpy(a: Mapping[str, Tensor], b: Mapping[str, Tensor], like: Mapping[str, Tensor], alpha: float = 1.0) -> PDict:
    """a + alpha * b over the parameters of `like` (missing entries are zero)."""
    out: PDict = {}
    for k, t in like.items():
        x = a.get(k)
        y = b.get(k)
        if x is None and y is None:
            out[k] = torch.zeros_like(t)
        elif y is None:
            out[k] = x  # type: ignore[assignment]
        elif x is None:
            out[k] = alpha * y
        else:
            out[k] = x + alpha * y
    return out


def _mul(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> PDict:
    """Elementwise a * b over the keys of b."""
    return {k: a[k] * v for k, v in b.items()}


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


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
        import pandas as pd

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


# ---------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------

Loss = Callable[[Any], Tensor]
"""outputs -> scalar loss, the targets already bound (`LossSpec.bind`, symmetry/loss.py)."""


class _Hessian:
    """Gradient and reusable Hessian-vector products of loss(model(*args)) at theta.

    HVPs are torch.func.vjp of torch.func.grad (reverse over reverse): H is symmetric, so the vjp
    of the gradient map with cotangent v is H v. The vjp closure is built once.
    """

    def __init__(self, model: nn.Module, loss: Loss, args: tuple[Any, ...], need_hvp: bool):
        from torch.func import functional_call, grad, vjp

        self.params = parameter_dict(model)
        buffers = {n: b for n, b in model.named_buffers()}

        def loss_of(p: Mapping[str, Tensor]) -> Tensor:
            return loss(functional_call(model, {**p, **buffers}, args))

        def loss_and_value(p: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
            value = loss_of(p)
            return value, value.detach()

        self.count = 0
        if need_hvp:  # one forward pass: gradient, loss value and the reusable HVP closure
            self.grad, self._vjp, value = vjp(  # type: ignore[misc]
                grad(loss_and_value, has_aux=True), self.params, has_aux=True
            )
        else:
            p = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
            value = loss_of(p)
            gs = torch.autograd.grad(value, list(p.values()), allow_unused=True)
            self.grad = {k: torch.zeros_like(v) if gk is None else gk for (k, v), gk in zip(p.items(), gs, strict=True)}
        self.grad = {k: t.detach() for k, t in self.grad.items()}
        self.loss = float(value.detach())

    def hvp(self, v: Mapping[str, Tensor]) -> PDict:
        self.count += 1
        full = {k: v[k] if k in v else torch.zeros_like(t) for k, t in self.params.items()}
        return {k: t.detach() for k, t in self._vjp(full)[0].items()}


class _HessianProbe:
    """Signed combinations of the Hessian constraints of many groups, one HVP pair per call.

    For signs s (n,), zero outside the probed block:
        v = sum_i s_i xi_i,  jg = sum_i s_i J_i^T g,  w = sum_i s_i u_i,
        residual(s) = H v + jg = sum_i s_i r_i          (linearity; the basis of the probe design)
    with xi_i = D_i theta, J_i^T g = D_i g (quadratic kinds), xi_i = D_i, J_i = 0 (translation), and
    u_i = u_coef_i |D_i| z (a shared Gaussian field z scaled so that |u_i| = |xi_i|).
    """

    def __init__(self, hes: _Hessian, inc: GroupIncidence, z: Mapping[str, Tensor], u_coef: Tensor):
        self.hes, self.inc, self.z, self.u_coef = hes, inc, z, u_coef
        self.quad_f = inc.quadratic.to(torch.float64)

    def directions(self, s: Tensor) -> tuple[PDict, PDict, PDict]:
        s = s.to(device=self.inc.device, dtype=torch.float64)
        theta, g = self.hes.params, self.hes.grad
        sq = s * self.quad_f
        dq = self.inc.expand(sq)
        v = _axpy(_mul(theta, dq), self.inc.expand(s - sq), theta)
        jg = _axpy({}, _mul(g, dq), theta)
        w = _axpy({}, _mul(self.z, self.inc.expand(s * self.u_coef, signed=False)), theta)
        return v, jg, w

    def residual(self, s: Tensor) -> PDict:
        """H v + sum_i s_i J_i^T g for the signs s (one HVP)."""
        v, jg, _ = self.directions(s)
        return _axpy(self.hes.hvp(v), jg, self.hes.params)

    def stats(self, s: Tensor) -> dict[str, float]:
        """Norms |R|, |H v|, |jg|, |H w|, |H w + jg| for the signs s (two HVPs)."""
        v, jg, w = self.directions(s)
        hv = self.hes.hvp(v)
        hw = self.hes.hvp(w)
        theta = self.hes.params
        return {
            "r": _norm(_axpy(hv, jg, theta)),
            "Hxi": _norm(hv),
            "Jg": _norm(jg),
            "Hu": _norm(hw),
            "ru": _norm(_axpy(hw, jg, theta)),
        }


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
        hes = _Hessian(work, spec.bind(targets), args, need_hvp=hessian and bool(syms))
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

    prober = _HessianProbe(hes, inc, z, u_coef)
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
