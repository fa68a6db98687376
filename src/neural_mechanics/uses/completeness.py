"""`completeness`: did we find them all? The output Jacobian's null space against the detected generators.

At a parameter point theta and on an input batch X, a direction v in parameter space leaves the outputs
unchanged to first order iff J v = 0, with J = d F / d theta and F(theta) = log_softmax(model(X)) over
dim 1 (all samples and classes flattened; raw outputs with loss="mse"). Every continuous symmetry gives
such directions: its generator xi(theta) satisfies J xi = 0 at every theta. So

    total = dim null(J)          found = dim( span{xi_i(theta)} intersected with null(J) )

and total - found counts directions that leave the outputs unchanged but that no detected group explains:
a symmetry the detector missed (e.g. the affine group h -> M h + v of a hidden layer between two linear layers
with nothing between them, k^2 + k directions of which the k one-parameter rescale groups span the diagonal),
or a property of the point and the batch rather than of the architecture.

Reading the count needs a generic point and a large batch:

* The batch must be large: rank(J) <= N (C - 1) (log-softmax rows sum to zero in exp), so with
  N (C - 1) < P - total the null space is inflated by the missing data. `completeness` refuses a batch with
  fewer independent outputs than parameters.
* ReLU-type units must be mixed on the batch. A unit inactive on every sample frees its incoming row and
  outgoing column; a unit active on every sample is linear on the batch (its bias can be pushed into the next
  layer's); two units of a layer with (nearly) the same active set act as one linear map there (mixing them is
  free); a unit whose active samples never see some input unit active leaves that weight free. Default
  initialisation often produces such units beyond the first layer; BatchNorm before the activation centres
  them; the tests put every bias at a random quantile of its unit's pre-activation.
* Even at generic points, ReLU networks have "hidden symmetries" on sets of parameters of positive measure
  (Grigsby, Lindsey & Rolnick, ICML 2023), more often the narrower and deeper the net and the smaller its
  input and output: extra directions that are not symmetries of the architecture (they do not hold at every
  point). A symmetry holds everywhere, so the architecture's count is the minimum of total over a few random
  points.
* Train-mode BatchNorm couples the samples of a batch; F is still a function of theta for the fixed batch
  X, so J is taken through the whole batch at once (rows are computed in chunks, the forward pass is one).

Numerics. J is built in float64 from vector-Jacobian products (torch.func.vjp, vmapped over chunks of output
rows) and compressed on the fly by a streaming QR (J = Q R, only R of size P x P is kept); the singular
values of R are those of J. A singular value sigma_j counts as zero when sigma_j <= rtol * sigma_max with
rtol = 1e-9. Why this tolerance: the exact null directions of J come out at float64 rounding, about
1e-16 * sqrt(rows) * depth * sigma_max, i.e. 1e-15 .. 1e-13 relative for the models this is meant for,
while the smallest genuinely non-zero singular values of a small network on a large generic batch are
around 1e-6 .. 1e-3 relative; 1e-9 sits in the middle of that gap with orders of magnitude to spare on
both sides. `gap` reports sigma(last kept) / sigma(first dropped): if it is not large (< 1e3), the count
is not reliable (a near-degenerate point or a badly scaled model), and `reliable` says so.

found is computed from principal angles: with V0 an orthonormal basis of the numerical null space and Q an
orthonormal basis of the generators' span (rank with the same relative tolerance), the cosines of the
angles between the two subspaces are the singular values of V0^T Q; found counts those above 1 - 1e-6.
Both bases are re-orthonormalised by a QR: LAPACK's divide-and-conquer SVD returns the singular vectors of a
cluster of tiny singular values orthogonal only to ~1e-6, the size of that threshold. A generator with
|J xi| > 1e3 rtol sigma_max |xi| is listed in `outside_null` (claimed, but not a symmetry at this point).
The unexplained directions are the part of null(J) orthogonal to the generators; `unexplained_by_parameter`
gives, per parameter, the squared mass of an orthonormal basis of them on that parameter's entries (the
masses add up to total - found). Per layer, `found_by_layer` is the rank of the generators of the groups
reported under that layer.

Cost: P vector-Jacobian products' worth of rows, a QR of P x P and an SVD of P x P in float64: meant for
small models (up to ~20 000 parameters, `max_params`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.utils import as_args, cast_inputs, fixed_rng, model_device, working_copy
from neural_mechanics.uses.orbits import SymmetryUseError

__all__ = ["MAX_PARAMS", "Completeness", "completeness", "require_small"]

RTOL = 1e-9
"""Relative singular-value threshold for the numerical rank of J (module docstring)."""
ANGLE_TOL = 1e-6
"""A generator direction counts as in null(J) when its principal cosine exceeds 1 - ANGLE_TOL."""
RELIABLE_GAP = 1e3
MAX_PARAMS = 20_000
"""Largest model the dense Jacobian is meant for (a P x P QR and SVD in float64)."""


def require_small(model: nn.Module, max_params: int = MAX_PARAMS) -> int:
    """The number of trainable parameters P; SymmetryUseError when P > max_params (checked before any work)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_params > max_params:
        raise SymmetryUseError(f"{type(model).__name__} has {n_params} parameters; the dense Jacobian is meant for "
                               f"at most max_params={max_params}",
                               "use a smaller model (the cost is a P x P QR and SVD in float64) or raise max_params")
    return n_params


@dataclass
class Completeness:
    """The result of `completeness`; `found` of `total` null directions are explained by detected groups."""

    found: int
    total: int
    n_params: int
    rank: int
    """Numerical rank of the output Jacobian."""
    rows: int
    """Rows of the Jacobian (outputs)."""
    gap: float
    """sigma(last kept) / sigma(first dropped); inf when nothing was dropped or everything was."""
    rtol: float
    generators: int
    """Rank of the detected generators' span."""
    found_by_layer: dict[str, int] = field(default_factory=dict)
    unexplained_by_parameter: dict[str, float] = field(default_factory=dict)
    """Per parameter, the squared mass of the unexplained null directions on it (sums to total - found)."""
    outside_null: list[str] = field(default_factory=list)
    """Groups whose generator is not in null(J) at this point (|J xi| > rtol sigma_max |xi|): not symmetries here."""
    singular_values: Tensor | None = None

    @property
    def reliable(self) -> bool:
        """True when the singular values show a clear gap (>= 1e3) at the rank cut."""
        return self.gap >= RELIABLE_GAP

    @property
    def unexplained(self) -> int:
        return self.total - self.found

    def unexplained_by_layer(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, mass in self.unexplained_by_parameter.items():
            layer = name.rpartition(".")[0]
            out[layer] = out.get(layer, 0.0) + mass
        return out

    def summary(self) -> str:
        lines = [f"found {self.found} of {self.total} directions that leave the outputs unchanged "
                 f"({self.n_params} parameters, Jacobian {self.rows} x {self.n_params}, rank {self.rank}, "
                 f"gap {self.gap:.2g}{'' if self.reliable else ' - NOT RELIABLE: no clear gap at the rank cut'})"]
        if self.outside_null:
            lines.append(f"  {len(self.outside_null)} detected group(s) are not symmetries at this point: "
                         + ", ".join(self.outside_null[:5]))
        by_layer = self.unexplained_by_layer()
        layers = list(dict.fromkeys([*self.found_by_layer, *by_layer]))
        if layers:
            lines.append(f"  {'layer':<40} {'found':>6} {'unexplained':>12}")
            for layer in layers:
                lines.append(f"  {layer or '(top)':<40} {self.found_by_layer.get(layer, 0):>6} "
                             f"{by_layer.get(layer, 0.0):>12.2f}")
        if self.unexplained:
            top = sorted(self.unexplained_by_parameter.items(), key=lambda kv: -kv[1])[:8]
            lines.append("  unexplained directions by parameter: "
                         + ", ".join(f"{n} {m:.2f}" for n, m in top if m >= 0.005))
        return "\n".join(lines)


def _streaming_r(f: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], names: list[str],
                 chunk: int) -> Tensor:
    """R of a QR factorisation of J = d f / d params: rows come from vmapped vector-Jacobian products in chunks
    of `chunk` (their memory is chunk x the backward pass of the whole batch) and are compressed with R
    whenever ~P of them have gathered (a QR of at most 2P x P each time, about (rows / P + 1) in all)."""
    out, pullback = vjp(f, params)[:2]
    rows = out.numel()
    n_params = sum(params[n].numel() for n in names)
    r = torch.zeros((0, n_params), dtype=torch.float64, device=out.device)
    pending: list[Tensor] = []
    pending_rows = 0
    pull_rows = vmap(pullback)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        basis = torch.zeros((stop - start, rows), dtype=out.dtype, device=out.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        (grads,) = pull_rows(basis)
        pending.append(torch.cat([grads[n].reshape(stop - start, -1) for n in names], dim=1))
        pending_rows += stop - start
        if pending_rows >= n_params or stop == rows:
            r = torch.linalg.qr(torch.cat([r, *pending], dim=0), mode="r")[1]
            pending, pending_rows = [], 0
    return r


def _flat_generators(symmetries: list[Symmetry], params: dict[str, Tensor], names: list[str]) -> Tensor:
    """[P, groups]: each group's generator xi(theta), flattened in the order of `names`."""
    offsets, total = {}, 0
    for n in names:
        offsets[n] = total
        total += params[n].numel()
    g = torch.zeros((total, len(symmetries)), dtype=torch.float64)
    for j, s in enumerate(symmetries):
        for n, v in s.generator(params).items():
            g[offsets[n]:offsets[n] + v.numel(), j] = v.reshape(-1).to(torch.float64).cpu()
    return g


def _reorthonormalise(basis: Tensor) -> Tensor:
    """The same span with columns orthonormal to float64 rounding (Householder QR).

    LAPACK's divide-and-conquer SVD (gesdd, what torch.linalg.svd runs on CPU) can return singular vectors of a
    cluster of tiny singular values that are orthogonal only to ~1e-6; each vector is still in the subspace,
    so a QR restores an orthonormal basis of it. Principal angles need that: 1 - cos ~ 1e-6 is the threshold.
    """
    return torch.linalg.qr(basis).Q if basis.shape[1] else basis


def _orthonormal(m: Tensor, rtol: float) -> Tensor:
    """Orthonormal basis of the column span of m (numerical rank with relative tolerance rtol)."""
    if m.shape[1] == 0:
        return m
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return m[:, :0]
    return _reorthonormalise(u[:, : int((s > rtol * s[0]).sum())])


def completeness(model: nn.Module, inputs: Any, symmetries: Iterable[Symmetry], *, loss: str = "cross_entropy",
                 rtol: float = RTOL, chunk: int = 256, seed: int = 0, max_params: int = MAX_PARAMS) -> Completeness:
    """How many of the output-preserving directions at the model's current parameters the groups explain.

    inputs: one batch (tensor or tuple of positional tensors), large enough that the independent outputs
    (N (C - 1) for log-softmax, N C raw) number at least P; loss: "cross_entropy" (log-softmax outputs over
    dim 1, where translation symmetries live) or "mse" (raw outputs). The model is not modified (a float64
    copy is analysed with normalisation eps set negligible, as for certification; dropout draws one fixed
    mask). See the module docstring for the definitions, the tolerance and what makes a point generic.
    """
    if loss not in ("cross_entropy", "mse"):
        raise SymmetryUseError(f"unknown loss {loss!r}", "use loss='cross_entropy' (log-softmax outputs) or 'mse'")
    syms = list(symmetries)
    n_params = require_small(model, max_params)
    device = model_device(model)
    work, _ = working_copy(model, torch.float64)
    params = {n: p.detach() for n, p in work.named_parameters() if p.requires_grad}
    names = list(params)
    buffers = dict(work.named_buffers())
    args = cast_inputs(as_args(inputs), torch.float64, device)

    def raw(p: dict[str, Tensor]) -> Tensor:
        with fixed_rng(seed, device):
            out = functional_call(work, {**p, **buffers}, args)
        if not isinstance(out, Tensor):
            raise SymmetryUseError(f"the model returns {type(out).__name__}, not a tensor",
                                   "wrap the model so that it returns the logits tensor")
        return out

    with torch.no_grad():
        out0 = raw(params)
    if loss == "cross_entropy" and out0.ndim < 2:
        raise SymmetryUseError(f"log-softmax over dim 1 needs outputs (N, C, ...), got {tuple(out0.shape)}",
                               "pass loss='mse' to use the raw outputs")
    lost = out0.numel() // out0.shape[1] if loss == "cross_entropy" else 0  # one per log-softmax row
    independent = out0.numel() - lost
    if independent < n_params:
        per_sample = max(independent // max(out0.shape[0], 1), 1)
        raise SymmetryUseError(
            f"the batch gives {independent} independent outputs for {n_params} parameters: the null space would be "
            "inflated by missing data", f"pass at least {math.ceil(n_params / per_sample)} samples")

    def f(p: dict[str, Tensor]) -> Tensor:
        out = raw(p)
        return (torch.log_softmax(out, dim=1) if loss == "cross_entropy" else out).reshape(-1)

    r = _streaming_r(f, params, names, chunk)
    _, sv, vh = torch.linalg.svd(r, full_matrices=True)
    smax = float(sv[0]) if sv.numel() else 0.0
    rank = int((sv > rtol * smax).sum()) if smax > 0 else 0
    kept = float(sv[rank - 1]) if rank > 0 else math.inf
    dropped = float(sv[rank]) if rank < sv.numel() else 0.0
    gap = kept / dropped if dropped > 0 else math.inf
    null = _reorthonormalise(vh[rank:].T.cpu())  # [P, total]: orthonormal basis of the numerical null space
    total = n_params - rank

    cpu_params = {n: p.cpu() for n, p in params.items()}
    groups = [s for s in syms if all(n in params for n in s.params)]
    gens = _flat_generators(groups, cpu_params, names)
    q = _orthonormal(gens, rtol)
    found = 0
    if null.shape[1] and q.shape[1]:
        found = int((torch.linalg.svdvals(null.T @ q) > 1 - ANGLE_TOL).sum())
    outside: list[str] = []
    if gens.shape[1]:
        tiny = torch.finfo(torch.float64).tiny
        jx = (r.cpu() @ gens).norm(dim=0)  # |J xi| = |R xi|
        bound = _OUTSIDE * rtol * max(smax, tiny) * gens.norm(dim=0).clamp_min(tiny)
        outside = [groups[j].name for j in torch.nonzero(jx > bound).flatten().tolist()]
    return Completeness(found, total, n_params, rank, out0.numel(), gap, rtol, q.shape[1],
                        _found_by_layer(groups, gens, rtol), _unexplained(null, q, total - found, params, names),
                        outside, sv.cpu())


_OUTSIDE = 1e3
"""A generator with |J xi| above 1e3 x rtol x sigma_max |xi| is reported as not a symmetry at this point."""


def _unexplained(null: Tensor, q: Tensor, k: int, params: dict[str, Tensor], names: list[str]) -> dict[str, float]:
    """Per parameter, the squared mass of an orthonormal basis of the k unexplained null directions."""
    if k <= 0:
        return {}
    resid = null - q @ (q.T @ null) if q.shape[1] else null
    u, _, _ = torch.linalg.svd(resid, full_matrices=False)
    mass = (_reorthonormalise(u[:, :k]) ** 2).sum(dim=1)
    out: dict[str, float] = {}
    start = 0
    for n in names:
        size = params[n].numel()
        m = float(mass[start:start + size].sum())
        if m > 1e-9:
            out[n] = m
        start += size
    return out


def _found_by_layer(groups: list[Symmetry], gens: Tensor, rtol: float) -> dict[str, int]:
    """Per reporting layer, the rank of the generators of the groups reported under it."""
    layers: dict[str, list[int]] = {}
    for j, s in enumerate(groups):
        layers.setdefault(s.layer, []).append(j)
    return {layer: _orthonormal(gens[:, idx], rtol).shape[1] for layer, idx in layers.items()}
