"""Numeric certification: apply each group's action and check that nothing the loss sees changes.

A symmetry claim (from `find_symmetries` or written by hand) is a statement about the model *and*
the loss: L(psi(theta, alpha)) = L(theta) for every alpha. Certification tests the statement
directly, which catches wrong groups whatever produced them, on a float64 deep copy of the model:

* alpha_i = exp(U(-1, 1)) for scale/rescale groups, a shift alpha_i ~ N(0, 1) for translation;
* every group at once (the composition of all actions, each group with its own alpha: scale and
  rescale actions multiply coordinates and commute, theta -> theta * exp(sum_i log(alpha_i) D_i),
  then the translations add sum_i alpha_i 1_A_i; a composition of symmetries is a symmetry), also
  per kind;
* each group alone (a random sample of `sample` groups per kind; sample=None: every group), with
  the reference action `Symmetry.act`.

relative change = |after - before| / max(|before|, tiny) for the loss; for the outputs the max-norm
of the difference over the max-norm of the outputs the loss reads (the logits for cross-entropy, every
output tensor otherwise: `LossSpec.observed`, symmetry/loss.py), for scale and rescale only: a
translation shifts the logits by design, which the softmax then ignores, so its output change is NaN.
The loss is the one find_symmetries and check_constraints use for the same argument (`as_loss_spec`).

Normalisation eps breaks scale symmetry by ~eps/var; on the copy it is set to a negligible value
(noted in the report), so that what remains is float64 rounding. Every forward pass runs under the
same forked RNG seed, so dropout draws the same mask before and after.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.symmetry.loss import LossLike, as_loss_spec
from neural_mechanics.symmetry.utils import (
    NEGLIGIBLE_EPS,
    Inputs,
    as_args,
    cast_inputs,
    fixed_rng,
    model_device,
    parameter_dict,
    working_copy,
)


@dataclass
class GroupCertification:
    """The outcome of one action: a single group, or a composition (kind "all" / a kind's name)."""

    name: str
    kind: str
    layer: str
    alpha: float
    rel_loss_change: float
    rel_output_change: float
    passed: bool
    scope: str = "group"
    """"group" for one group acting alone, "all" for a composition of many groups."""
    n_groups: int = 1


@dataclass
class CertificationReport:
    """Per-group and all-at-once results of `certify`."""

    results: list[GroupCertification]
    all_at_once: list[GroupCertification]
    tol: float
    loss: str
    loss_before: float
    n_groups: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every tested action (single groups and compositions) passed."""
        return all(r.passed for r in self.results) and all(r.passed for r in self.all_at_once)

    def failures(self) -> list[GroupCertification]:
        return [r for r in (*self.all_at_once, *self.results) if not r.passed]

    def worst(self) -> GroupCertification | None:
        """The single-group result with the largest relative change (loss or outputs)."""
        pool = self.results or self.all_at_once
        if not pool:
            return None
        return max(pool, key=_badness)

    def to_frame(self) -> Any:
        """One row per tested action (pandas DataFrame); `scope` tells single groups from compositions."""
        cols = list(GroupCertification.__dataclass_fields__)
        return pd.DataFrame([asdict(r) for r in (*self.all_at_once, *self.results)], columns=cols)

    def summary(self) -> str:
        lines = [f"certification: {self.n_groups} groups, loss {self.loss} = {self.loss_before:.6g}, tol {self.tol:g}"]
        for r in self.all_at_once:
            lines.append(f"  {r.name:<28} ({r.n_groups:>5} groups) loss change {r.rel_loss_change:.2e}"
                         f"  output change {r.rel_output_change:.2e}  {'ok' if r.passed else 'FAILED'}")
        by_kind: dict[str, list[GroupCertification]] = {}
        for r in self.results:
            by_kind.setdefault(r.kind, []).append(r)
        for kind, rs in by_kind.items():
            worst = max(rs, key=_badness)
            n_bad = sum(not r.passed for r in rs)
            lines.append(f"  {kind:<11} {len(rs):>5} groups tested alone: {n_bad} failed; worst {worst.name} "
                         f"(loss {worst.rel_loss_change:.2e}, outputs {worst.rel_output_change:.2e})")
        fails = [r for r in self.results if not r.passed]
        for r in fails[:10]:
            lines.append(f"  FAILED {r.kind} {r.name}: loss {r.rel_loss_change:.2e}, outputs {r.rel_output_change:.2e}")
        if len(fails) > 10:
            lines.append(f"  ... and {len(fails) - 10} more failures")
        lines.append("all actions leave the loss unchanged" if self.ok else "SOME ACTIONS CHANGE THE LOSS")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _badness(r: GroupCertification) -> float:
    vals = [v for v in (r.rel_loss_change, r.rel_output_change) if not math.isnan(v)]
    return max(vals) if vals else math.inf


def _max_abs(ts: Sequence[Tensor]) -> float:
    return max((float(t.detach().abs().max()) for t in ts if t.numel()), default=0.0)


def compose_actions(
    incidence: GroupIncidence, params: Mapping[str, Tensor], alphas: Tensor, select: Tensor | None = None
) -> dict[str, Tensor]:
    """All selected groups acting at once, each with its own alpha_i (touched parameters only).

    theta' = theta * exp(sum_i log(alpha_i) D_i) + sum_j alpha_j 1_A_j over the scale/rescale
    groups i and the translation groups j: every scale/rescale action first (they multiply
    coordinates, so they commute), then every translation (they add, so they commute).
    """
    quad = incidence.quadratic.cpu()
    alphas = alphas.to(torch.float64).cpu()
    sel = torch.ones(len(alphas), dtype=torch.bool) if select is None else select.cpu().bool()
    if bool((alphas[quad & sel] <= 0).any()):
        raise NMechError("scale and rescale actions need alpha > 0", "draw alpha = exp(u) for those groups")
    log_alpha = torch.where(quad & sel, alphas.clamp_min(torch.finfo(torch.float64).tiny).log(), 0.0)
    shifts = torch.where(~quad & sel, alphas, 0.0)
    factor = incidence.expand(log_alpha)
    added = incidence.expand(shifts)
    out: dict[str, Tensor] = {}
    for k in factor:
        p = params[k]
        out[k] = (p.to(torch.float64) * factor[k].exp() + added[k]).to(p.dtype)
    return out


def certify(
    model: nn.Module,
    symmetries: Iterable[Symmetry],
    example_inputs: Inputs,
    *,
    loss: LossLike = "cross_entropy",
    targets: Tensor | None = None,
    sample: int | None = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-6,
    norm_eps: float | None = NEGLIGIBLE_EPS,
) -> CertificationReport:
    """Apply the group actions numerically and report per group whether loss and outputs are unchanged.

    loss: the loss argument of find_symmetries and check_constraints (symmetry/loss.py): "cross_entropy" /
    "softmax" (targets: the given ones, or seeded random class indices over the class axis of the logits),
    "mse" / None (against the given targets, or seeded random ones), a callable loss(outputs) -> scalar,
    a callable loss(outputs, targets) with `targets`, or a LossSpec. The outputs compared are those the
    loss reads (`LossSpec.observed`: the logits for cross-entropy, every output tensor otherwise).
    A result passes when rel_loss_change <= tol and (scale/rescale) rel_output_change <= tol.
    Train-mode BatchNorm normalises with batch statistics in every evaluation; the model itself
    (parameters, buffers, train/eval modes, dtype, device) is left exactly as it was.
    """
    syms = list(symmetries)
    if sample is not None and sample < 0:
        raise NMechError(f"sample must be >= 0 or None, got {sample}", "use sample=64 or sample=None (every group)")
    spec = as_loss_spec(loss)
    device = model_device(model)
    work, notes = working_copy(model, dtype, norm_eps)
    args = cast_inputs(as_args(example_inputs), dtype, device)
    params = parameter_dict(work)
    buffers = dict(work.named_buffers())
    gen = torch.Generator().manual_seed(seed)

    def forward(p: dict[str, Tensor]) -> Any:
        with torch.no_grad(), fixed_rng(seed, device):
            return functional_call(work, {**p, **buffers}, args)

    out0 = forward(params)
    loss_fn = spec.bind(targets, like=out0, generator=gen)
    with torch.no_grad():
        loss0 = float(loss_fn(out0))
    leaves0 = spec.observed(out0)
    scale0 = _max_abs(leaves0)
    tiny = torch.finfo(torch.float64).tiny

    def measure(p: dict[str, Tensor], with_outputs: bool) -> tuple[float, float]:
        out = forward(p)
        with torch.no_grad():
            rel_loss = abs(float(loss_fn(out)) - loss0) / max(abs(loss0), tiny)
        if not with_outputs:
            return rel_loss, math.nan
        diff = _max_abs([a - b for a, b in zip(spec.observed(out), leaves0, strict=True)])
        return rel_loss, diff / max(scale0, tiny)

    # random factors, one per group (shared by the composed and the single-group actions)
    quad = [KINDS[s.kind].quadratic for s in syms]
    u = torch.rand(len(syms), generator=gen, dtype=torch.float64) * 2 - 1
    shift = torch.randn(len(syms), generator=gen, dtype=torch.float64)
    alphas = [math.exp(float(u[i])) if q else float(shift[i]) for i, q in enumerate(quad)]

    all_at_once: list[GroupCertification] = []
    if syms:
        inc = GroupIncidence(syms, params)
        q_t = inc.quadratic.cpu()
        alpha_t = torch.tensor(alphas, dtype=torch.float64)
        subsets: list[tuple[str, str, torch.Tensor]] = [("<all>", "all", torch.ones(len(syms), dtype=torch.bool))]
        kinds_present = [k for k in KINDS if any(s.kind == k for s in syms)]
        for k in kinds_present:
            subsets.append((f"<all {k}>", k, torch.tensor([s.kind == k for s in syms])))
        if "scale" in kinds_present and "rescale" in kinds_present:
            subsets.append(("<all scale+rescale>", "scale+rescale", q_t.clone()))
        if len(kinds_present) == 1:
            subsets = subsets[:1]
        for name, kind, sel in subsets:
            moved = {**params, **compose_actions(inc, params, alpha_t, sel)}
            has_translation = bool((sel & ~q_t).any())
            rl, ro = measure(moved, with_outputs=not has_translation)
            passed = rl <= tol and (has_translation or ro <= tol)
            all_at_once.append(GroupCertification(name, kind, "", math.nan, rl, ro, passed, "all", int(sel.sum())))

    # single groups: a seeded sample per kind
    chosen: list[int] = []
    for k in KINDS:
        idx = [i for i, s in enumerate(syms) if s.kind == k]
        if sample is not None and len(idx) > sample:
            perm = torch.randperm(len(idx), generator=gen)[:sample].sort().values.tolist()
            idx = [idx[j] for j in perm]
        chosen += idx
    chosen.sort()
    results: list[GroupCertification] = []
    for i in chosen:
        s = syms[i]
        moved = {**params, **s.act(params, alphas[i])}
        rl, ro = measure(moved, with_outputs=quad[i])
        passed = rl <= tol and (not quad[i] or ro <= tol)
        results.append(GroupCertification(s.name, s.kind, s.layer, alphas[i], rl, ro, passed))
    if sample is not None and len(chosen) < len(syms):
        notes.append(f"{len(chosen)} of {len(syms)} groups tested alone (sample={sample} per kind); "
                     "all groups are in the all-at-once compositions")
    return CertificationReport(results, all_at_once, tol, spec.name, loss0, len(syms), notes)
