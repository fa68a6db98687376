"""`equalize`: cross-layer equalisation of per-channel weight ranges for quantisation, on every rescale group.

Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction" (ICCV 2019), section 4.1: for two layers W1 (writer) and W2 (reader) around a positively
homogeneous activation, channel i may be rescaled as W1[i] / s_i, b1[i] / s_i, W2[:, i] * s_i without
changing the function. With r1_i the range of W1's output channel i and r2_i the range of W2's input
channel i, the choice

    s_i = sqrt(r1_i r2_i) / r2_i        (so that both ranges become sqrt(r1_i r2_i))

maximises the total per-channel precision of per-tensor quantisation. In the language of this library that
pair is one rescale group (A1 = writer rows and bias, A2 = reader columns) with alpha_i = 1 / s_i =
sqrt(r2_i / r1_i). Generalised here from fixed layer patterns to every rescale group of any graph (residual
streams, attention value/output and query/key pairs, grouped convolutions): r1 = max |theta| over the A1
entries that are quantised, r2 the same over A2. "Range" is the largest magnitude, the range of symmetric
quantisation (the paper's max - min differs by a factor that cancels in s for symmetric weights).

Which entries are quantised: `quantized(name, tensor)`, by default tensors with ndim >= 2 (conv, linear and
embedding weights); biases and normalisation affines stay in float, they are moved but not measured. A
group with no quantised entry on one side (e.g. a train-mode BatchNorm affine as A1) has no range to
equalise and is left alone; fold BatchNorm first (`fold_batchnorm`), as the paper does.

Overlapping groups (layer l's rows are A1 of its groups and A2 of layer l - 1's) are equalised by the
paper's own recipe, alternating until converged, here over colour classes of pairwise disjoint groups
(orbits.py). Convergence criterion: max over groups of |log(r1 / r2)| <= tol (default 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.uses.orbits import CoreState, Orbits, SymmetryUseError, float64_params, transform_model

__all__ = ["EqualizeResult", "channel_ranges", "default_quantized", "equalize", "equalize_params",
           "equalize_with_result"]

Selector = Callable[[str, Tensor], bool]


def default_quantized(name: str, tensor: Tensor) -> bool:
    """True for weight tensors (ndim >= 2), the tensors int8 inference quantises; False for biases and affines."""
    return tensor.ndim >= 2


@dataclass
class EqualizeResult:
    """What `equalize_params` did."""

    sweeps: int
    residual: float
    """max over equalised groups of |log(r1 / r2)|."""
    converged: bool
    equalized: int
    """Number of groups with quantised entries on both sides (the ones equalised)."""
    skipped: list[str] = field(default_factory=list)
    """Rescale groups without quantised entries on one side, left alone."""


def equalize_params(params: dict[str, Tensor], symmetries: Iterable[Symmetry], *,
                    quantized: Selector = default_quantized, tol: float = 1e-6,
                    max_sweeps: int = 1000) -> EqualizeResult:
    """Equalise a float64 parameter dict in place (see the module docstring); returns what was done."""
    if tol <= 0 or max_sweeps < 1:
        raise SymmetryUseError("tol must be > 0 and max_sweeps >= 1", "e.g. tol=1e-6, max_sweeps=1000")
    groups = [s for s in symmetries if s.kind == "rescale"]
    if not groups:
        return EqualizeResult(0, 0.0, True, 0)
    orbits = Orbits(groups, params)
    state = CoreState(orbits, params, include_max=quantized)
    r1, r2 = state.maxima()
    live = (r1 > 0) & (r2 > 0)
    skipped = [g.name for g, ok in zip(groups, live.tolist(), strict=True) if not ok]

    def residual() -> float:
        a, b = state.maxima()
        return float((a[live].log() - b[live].log()).abs().max()) if bool(live.any()) else 0.0

    res = residual()
    sweeps = 0
    while res > tol and sweeps < max_sweeps:
        sweeps += 1
        for colour in orbits.colors:
            sel = orbits.selected(colour)
            sel &= live
            r1, r2 = state.maxima()
            u = orbits.zeros()
            u[sel] = 0.5 * (r2[sel].log() - r1[sel].log())  # alpha = 1 / s = sqrt(r2 / r1)
            state.multiply(u)
        res = residual()
    state.apply(params)
    return EqualizeResult(sweeps, res, res <= tol, int(live.sum()), skipped)


def equalize(model: nn.Module, symmetries: Iterable[Symmetry], *, inplace: bool = False,
             quantized: Selector = default_quantized, tol: float = 1e-6, max_sweeps: int = 1000) -> nn.Module:
    """A copy of `model` (or the model, inplace=True) with the per-channel weight ranges of every rescale group
    equalised (Nagel et al. 2019; module docstring). The function is unchanged; pass certified groups.

    A RuntimeWarning says so when max_sweeps ran out before max |log(r1 / r2)| <= tol.
    """
    return equalize_with_result(model, symmetries, inplace=inplace, quantized=quantized, tol=tol,
                                max_sweeps=max_sweeps)[0]


def equalize_with_result(model: nn.Module, symmetries: Iterable[Symmetry], *, inplace: bool = False,
                         quantized: Selector = default_quantized, tol: float = 1e-6,
                         max_sweeps: int = 1000) -> tuple[nn.Module, EqualizeResult]:
    """`equalize`, and what it did (groups equalised and skipped, sweeps, final residual)."""
    syms = list(symmetries)
    touched = dict.fromkeys(p for s in syms if s.kind == "rescale" for p in s.params)
    return transform_model(
        model, inplace,
        lambda params: equalize_params(params, syms, quantized=quantized, tol=tol, max_sweeps=max_sweeps),
        touched, "equalize")


def channel_ranges(model: nn.Module, symmetries: Iterable[Symmetry], *,
                   quantized: Selector = default_quantized) -> dict[str, tuple[float, float]]:
    """Per rescale group, (r1, r2): the largest |theta| over the quantised entries of A1 and of A2."""
    groups = [s for s in symmetries if s.kind == "rescale"]
    if not groups:
        return {}
    params = float64_params(model)
    r1, r2 = CoreState(Orbits(groups, params), params, include_max=quantized).maxima()
    return {g.name: (float(a), float(b)) for g, a, b in zip(groups, r1.tolist(), r2.tolist(), strict=True)}
