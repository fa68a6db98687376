"""Numeric certification: apply each group's action and check that nothing the loss sees changes.

A symmetry claim (from `find_symmetries` or written by hand) is a statement about the model *and*
the loss: L(psi(theta, alpha)) = L(theta) for EVERY theta and alpha. Certification tests the statement
directly, which catches wrong groups whatever produced them, on a float64 deep copy of the model:

* at a generic point theta' (symmetry/generic_point.py): the model's parameters plus a seeded random
  perturbation of every parameter tensor, zero-initialised ones included, so that a zero-initialised branch
  or a 1e-6 layer scale cannot hide a wrong group (perturbation=0 tests at the model's own parameters);
* alpha_i = exp(U(-1, 1)) for scale/rescale groups, a shift alpha_i ~ N(0, 1) for translation;
* every group at once (the composition of all actions, each group with its own alpha: scale and
  rescale actions multiply coordinates and commute, theta -> theta * exp(sum_i log(alpha_i) D_i),
  then the translations add sum_i alpha_i 1_A_i; a composition of symmetries is a symmetry), also
  per kind;
* each group alone (a random sample of `sample` groups per kind; sample=None: every group), with
  the reference action `Symmetry.act`.

Each action is judged against a baseline, what a non-symmetry does at the same point: the parameters moved
by a seeded Gaussian direction u on exactly the coordinates the action moved, with |u| equal to the action's
displacement |psi(theta', alpha) - theta'|. With c the action's relative change and b the baseline's,

    passed    = c <= max(tol * b, ROUNDING)          (tol 1e-6: the action does < 1e-6 of what a random move does)
    conclusive = b >= MIN_BASELINE                    (the test had power: a random move does change something)

for the loss, and for scale/rescale also for the outputs the loss reads (passed needs both; conclusive needs
either baseline to reach MIN_BASELINE). A relative tolerance scales with the
point: a wrong group inside a branch damped by 1e-6 changes the loss by ~1e-7, and so does its baseline, so it
fails; a real group changes it by float64 rounding only. A group whose baseline is below MIN_BASELINE (its
coordinates do not reach the loss on these inputs at this point, e.g. a ReLU unit dead for the whole batch) is
reported as inconclusive: not refuted, not vouched for.

relative change = |after - before| / max(|before|, tiny) for the loss; for the outputs, the max-norm of the
difference over the max-norm of the outputs the loss reads (`LossSpec.reads`: the scored logits of a softmax
loss, every floating output for mse, what a callable loss depends on (found by autograd)); for scale and
rescale only: a translation shifts the logits by design, which the softmax then ignores, so its output change
is NaN. The loss is the one find_symmetries and check_constraints use for the same argument (`as_loss_spec`).

Normalisation eps breaks scale symmetry by ~eps/var; on the copy it is set to a negligible value
(noted in the report), so that what remains is float64 rounding. Every forward pass runs under the
same forked RNG seed, so dropout draws the same mask before and after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from neural_mechanics.errors import NMechError
from neural_mechanics.symmetry.generic_point import PERTURBATION, generic_point
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.symmetry.loss import LossLike, as_loss_spec
from neural_mechanics.symmetry.outputs import leaves_at
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

ROUNDING = 1e-12
"""A relative change at or below this is float64 rounding: it passes whatever the baseline (real groups measure
1e-16 to 1e-14 on the test models, deep torchvision models included)."""
MIN_BASELINE = 1e-9
"""A baseline below this (1000x ROUNDING) leaves the test without power: the result is marked inconclusive."""


@dataclass
class GroupCertification:
    """The outcome of one action: a single group, or a composition (kind "all" / a kind's name).

    `baseline_*`: the same measure for a random move of the same coordinates by the same distance (see the module
    docstring); `conclusive`: the loss (or, for scale/rescale, output) baseline is at least MIN_BASELINE, so the
    test could have failed.
    """

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
    baseline_loss_change: float = math.nan
    baseline_output_change: float = math.nan
    conclusive: bool = True


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
    point: str = "the model's own parameters (no perturbation)"
    """Where the actions were applied (`GenericPoint.describe`)."""
    compared: list[str] = field(default_factory=list)
    """The outputs compared (path and shape), i.e. those the loss reads."""
    loss_detail: str = ""
    """The loss in words (for a softmax loss: the axis and the positions it scores)."""

    @property
    def ok(self) -> bool:
        """True when every tested action (single groups and compositions) passed."""
        return all(r.passed for r in self.results) and all(r.passed for r in self.all_at_once)

    def failures(self) -> list[GroupCertification]:
        return [r for r in (*self.all_at_once, *self.results) if not r.passed]

    def inconclusive(self) -> list[GroupCertification]:
        """Passed actions whose baseline was below MIN_BASELINE (not refuted, but not vouched for either)."""
        return [r for r in (*self.all_at_once, *self.results) if r.passed and not r.conclusive]

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
        lines = [f"certification: {self.n_groups} groups, loss {self.loss} = {self.loss_before:.6g}, "
                 f"tol {self.tol:g} x baseline",
                 f"  at {self.point}"]
        if self.loss_detail and self.loss_detail != self.loss:
            lines.append(f"  loss: {self.loss_detail}")
        lines.append("  outputs compared (those the loss reads): "
                     + (", ".join(self.compared) if self.compared else "none (the loss reads no floating output)"))
        lines.append("  change of the loss / outputs under the action vs a random move of the same coordinates "
                     "by the same distance (baseline)")
        for r in self.all_at_once:
            lines.append(f"  {r.name:<28} ({r.n_groups:>5} groups) loss {r.rel_loss_change:.2e} (baseline "
                         f"{r.baseline_loss_change:.2e})  outputs {r.rel_output_change:.2e} (baseline "
                         f"{r.baseline_output_change:.2e})  {_verdict(r)}")
        by_kind: dict[str, list[GroupCertification]] = {}
        for r in self.results:
            by_kind.setdefault(r.kind, []).append(r)
        for kind, rs in by_kind.items():
            worst = max(rs, key=_badness)
            n_bad = sum(not r.passed for r in rs)
            lines.append(f"  {kind:<11} {len(rs):>5} groups tested alone: {n_bad} failed; worst {worst.name} "
                         f"(loss {worst.rel_loss_change:.2e} vs baseline {worst.baseline_loss_change:.2e}, "
                         f"outputs {worst.rel_output_change:.2e})")
        fails = [r for r in self.results if not r.passed]
        for r in fails[:10]:
            lines.append(f"  FAILED {r.kind} {r.name}: loss {r.rel_loss_change:.2e} (baseline "
                         f"{r.baseline_loss_change:.2e}), outputs {r.rel_output_change:.2e} (baseline "
                         f"{r.baseline_output_change:.2e})")
        if len(fails) > 10:
            lines.append(f"  ... and {len(fails) - 10} more failures")
        weak = self.inconclusive()
        if weak:
            names = ", ".join(r.name for r in weak[:5]) + (" ..." if len(weak) > 5 else "")
            lines.append(f"  {len(weak)} action(s) inconclusive: a random move of their coordinates changes the "
                         f"loss and outputs by < {MIN_BASELINE:g} here (coordinates the loss does not read on these "
                         f"inputs, e.g. dead units, or a batch too small for train-mode BatchNorm), so passing vouches "
                         f"for nothing ({names})")
        lines.append("all actions leave the loss unchanged" if self.ok else "SOME ACTIONS CHANGE THE LOSS")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _verdict(r: GroupCertification) -> str:
    return "FAILED" if not r.passed else "ok" if r.conclusive else "ok (inconclusive)"


def _badness(r: GroupCertification) -> float:
    vals = [v for v in (r.rel_loss_change, r.rel_output_change) if not math.isnan(v)]
    return max(vals) if vals else math.inf


def _max_abs(ts: Sequence[Tensor]) -> float:
    return max((float(t.detach().abs().max()) for t in ts if t.numel()), default=0.0)


def within(change: float, baseline: float, tol: float) -> bool:
    """change <= max(tol * baseline, ROUNDING); a NaN change fails, a non-finite baseline allows rounding only."""
    if math.isnan(change):
        return False
    limit = tol * baseline if math.isfinite(baseline) else 0.0
    return change <= max(limit, ROUNDING)


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


def random_move(params: Mapping[str, Tensor], moved: Mapping[str, Tensor], generator: torch.Generator
                ) -> dict[str, Tensor]:
    """The baseline of an action: theta + u, u Gaussian on the coordinates the action moved (moved != theta),
    scaled to |u| = |moved - theta| (touched parameters only; float32 draws on the CPU in `moved`'s order: u is
    only a direction, its precision does not matter, and float32 draws are about twice as fast)."""
    still: dict[str, Tensor] = {}  # where moved == theta (a bool mask: the displacement itself is not kept)
    sq = 0.0
    for k in moved:
        d = moved[k].to(torch.float64) - params[k].to(torch.float64)
        sq += float(torch.linalg.vector_norm(d)) ** 2
        still[k] = d == 0
        del d
    norm = math.sqrt(sq)
    z: dict[str, Tensor] = {}
    for k, mask in still.items():
        zk = torch.randn(mask.shape, generator=generator, dtype=torch.float32).to(device=mask.device,
                                                                                  dtype=torch.float64)
        z[k] = zk.masked_fill_(mask, 0.0)
    z_norm = math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in z.values()))
    c = norm / z_norm if z_norm > 0 else 0.0
    return {k: z[k].mul_(c).add_(params[k]).to(params[k].dtype) for k in still}


def certify(
    model: nn.Module,
    symmetries: Iterable[Symmetry],
    example_inputs: Inputs,
    *,
    loss: LossLike = "cross_entropy",
    targets: Any = None,
    sample: int | None = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-6,
    norm_eps: float | None = NEGLIGIBLE_EPS,
    perturbation: float = PERTURBATION,
) -> CertificationReport:
    """Apply the group actions at a generic point and report per group whether loss and outputs are unchanged.

    loss: the loss argument of find_symmetries and check_constraints (symmetry/loss.py): "cross_entropy" /
    "softmax" (targets: the given ones, or seeded random class indices over the class axis of the logits),
    "next_token" / "causal_lm" / "masked_token" (token logits (B, T, V), targets (B, T)), "mse" / None (against
    the given targets, or seeded random ones), a callable loss(outputs) -> scalar, a callable
    loss(outputs, targets) with `targets`, or a LossSpec. The outputs compared are those the loss reads
    (`LossSpec.reads`).
    perturbation: eps of the generic point (symmetry/generic_point.py; 0: the model's own parameters).
    tol: an action passes when its relative change of the loss (and, for scale/rescale, of the outputs) is at
    most tol times the baseline's, a random move of the same coordinates by the same distance (or is float64
    rounding, <= ROUNDING); see the module docstring.
    Train-mode BatchNorm normalises with batch statistics in every evaluation; the model itself
    (parameters, buffers, train/eval modes, dtype, device) is left exactly as it was.
    """
    syms = list(symmetries)
    if sample is not None and sample < 0:
        raise NMechError(f"sample must be >= 0 or None, got {sample}", "use sample=64 or sample=None (every group)")
    if not (perturbation >= 0 and math.isfinite(perturbation)):
        raise NMechError(f"perturbation must be a finite number >= 0, got {perturbation}",
                         "use the default (0.5) or 0 to test at the model's own parameters")
    spec = as_loss_spec(loss)
    device = model_device(model)
    work, notes = working_copy(model, dtype, norm_eps)
    args = cast_inputs(as_args(example_inputs), dtype, device)
    point = generic_point(parameter_dict(work), perturbation=perturbation, seed=seed)
    with torch.no_grad():  # the copy holds the point itself: one float64 set of parameters in memory, not two
        for name, p in work.named_parameters():
            p.copy_(point.params[name])
    point.params = params = parameter_dict(work)
    buffers = dict(work.named_buffers())
    gen = torch.Generator().manual_seed(seed)

    def forward(p: dict[str, Tensor]) -> Any:
        with torch.no_grad(), fixed_rng(seed, device):
            return functional_call(work, {**p, **buffers}, args)

    out0 = forward(params)
    loss_fn = spec.bind(targets, like=out0, generator=gen)
    with torch.no_grad():
        loss0 = float(loss_fn(out0))
    reads = spec.reads(out0, loss_fn)
    compared = [f"{path} {tuple(t.shape)}" for path, t in reads]
    leaves0 = [t for _, t in reads]
    scale0 = _max_abs(leaves0)
    tiny = torch.finfo(torch.float64).tiny
    measure = _measurer(forward, loss_fn, spec.observed if spec.kind != "custom" else _reader(reads),
                        loss0, leaves0, scale0, tiny)

    def judge(moved: dict[str, Tensor], with_outputs: bool) -> tuple[float, float, float, float, bool, bool]:
        rl, ro = measure({**params, **moved}, with_outputs)
        bl, bo = measure({**params, **random_move(params, moved, gen)}, with_outputs)
        judged_outputs = with_outputs and bool(leaves0)
        ok = within(rl, bl, tol) and (not judged_outputs or within(ro, bo, tol))
        return rl, ro, bl, bo, ok, bl >= MIN_BASELINE or (judged_outputs and bo >= MIN_BASELINE)

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
            has_translation = bool((sel & ~q_t).any())
            rl, ro, bl, bo, ok, sure = judge(compose_actions(inc, params, alpha_t, sel), not has_translation)
            all_at_once.append(GroupCertification(name, kind, "", math.nan, rl, ro, ok, "all", int(sel.sum()),
                                                  bl, bo, sure))

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
        rl, ro, bl, bo, ok, sure = judge(s.act(params, alphas[i]), quad[i])
        results.append(GroupCertification(s.name, s.kind, s.layer, alphas[i], rl, ro, ok, "group", 1, bl, bo, sure))
    if sample is not None and len(chosen) < len(syms):
        notes.append(f"{len(chosen)} of {len(syms)} groups tested alone (sample={sample} per kind); "
                     "all groups are in the all-at-once compositions")
    return CertificationReport(results, all_at_once, tol, spec.name, loss0, len(syms), notes,
                               point=point.describe(), compared=compared, loss_detail=spec.describe(out0))


def _reader(reads: Sequence[tuple[str, Tensor]]) -> Callable[[Any], list[Tensor]]:
    """For a callable loss: the output tensors at the paths it was found to read (`LossSpec.reads`)."""
    paths = [path for path, _ in reads]
    return lambda out: leaves_at(out, paths)


def _measurer(forward: Callable[[dict[str, Tensor]], Any], loss_fn: Callable[[Any], Tensor],
              observed: Callable[[Any], list[Tensor]], loss0: float, leaves0: list[Tensor], scale0: float,
              tiny: float) -> Callable[[dict[str, Tensor], bool], tuple[float, float]]:
    """p -> (relative loss change, relative change of the outputs the loss reads (NaN unless with_outputs))."""

    def measure(p: dict[str, Tensor], with_outputs: bool) -> tuple[float, float]:
        out = forward(p)
        with torch.no_grad():
            rel_loss = abs(float(loss_fn(out)) - loss0) / max(abs(loss0), tiny)
        if not with_outputs or not leaves0:
            return rel_loss, math.nan
        diff = _max_abs([a - b for a, b in zip(observed(out), leaves0, strict=True)])
        return rel_loss, diff / max(scale0, tiny)

    return measure
