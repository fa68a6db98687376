"""`act`: apply group actions to a model (on a copy by default).

For scale and rescale groups i with factors alpha_i > 0 and translation groups j with shifts t_j, the
result is the composition

    theta' = theta * exp(sum_i log(alpha_i) D_i) + sum_j t_j 1_{A_j}

(every multiplicative action first, they commute; then every translation, they commute too; D_i = +1 on
A / A1 and -1 on A2). This is `symmetry.certify.compose_actions`, the composition certification tests, so a
certified set of groups moved this way leaves loss and outputs unchanged. For one group it is exactly
`Symmetry.act`: alpha theta_A (scale), alpha theta_A1 and theta_A2 / alpha (rescale), theta + t 1_A
(translation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.certify import compose_actions
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.symmetry.utils import as_args, cast_inputs, fixed_rng, model_device, working_copy
from neural_mechanics.uses.orbits import SymmetryUseError, float64_params, target_model, write_back

__all__ = ["act", "function_change"]

Factors = float | Sequence[float] | Tensor | Mapping[str, float]


def _factor_vector(symmetries: list[Symmetry], factors: Factors) -> Tensor:
    """One factor per group, float64, validated (alpha > 0 for scale and rescale, finite everywhere)."""
    n = len(symmetries)
    if isinstance(factors, Mapping):
        names = {s.name for s in symmetries}
        unknown = [k for k in factors if k not in names]
        if unknown:
            raise SymmetryUseError(f"factors name groups that are not in the set: {unknown[:5]}",
                                   "key the mapping by Symmetry.name of the groups passed")
        neutral = [0.0 if s.kind == "translation" else 1.0 for s in symmetries]
        vec = torch.tensor([float(factors.get(s.name, neutral[i])) for i, s in enumerate(symmetries)],
                           dtype=torch.float64)
    elif isinstance(factors, (int, float)):
        vec = torch.full((n,), float(factors), dtype=torch.float64)
    else:
        vec = torch.as_tensor(factors, dtype=torch.float64).flatten()
        if vec.numel() != n:
            raise SymmetryUseError(f"{vec.numel()} factors for {n} groups",
                                   "pass one factor per group, a single number, or a mapping name -> factor")
    if not bool(torch.isfinite(vec).all()):
        raise SymmetryUseError("factors must be finite", "pass finite numbers")
    bad = [s.name for s, a in zip(symmetries, vec.tolist(), strict=True) if s.kind != "translation" and a <= 0]
    if bad:
        raise SymmetryUseError(f"scale and rescale factors must be > 0; not so for {bad[:5]}",
                               "use alpha = exp(u) for any real u (translations take any real shift)")
    return vec


def act(model: nn.Module, symmetries: Symmetry | Iterable[Symmetry], factors: Factors, *,
        inplace: bool = False) -> nn.Module:
    """Apply the actions of `symmetries` with `factors` to `model`; a copy unless inplace=True.

    factors: one number for every group, a sequence or tensor with one factor per group (in order), or a
    mapping {group name: factor} (groups left out stay put). Scale and rescale factors are alpha > 0;
    translation factors are shifts t. The composition is computed in float64 and cast back to each
    parameter's dtype; parameters no group touches are not changed.
    """
    syms = [symmetries] if isinstance(symmetries, Symmetry) else list(symmetries)
    alphas = _factor_vector(syms, factors)
    out = target_model(model, inplace)
    if not syms:
        return out
    params = float64_params(out)
    incidence = GroupIncidence(syms, params, error=SymmetryUseError)  # validates the groups against the model
    moved = compose_actions(incidence, params, alphas)
    write_back(out, moved, moved)
    return out



def function_change(model_a: nn.Module, model_b: nn.Module, inputs: Any, *, loss: str = "cross_entropy",
                    seed: int = 0) -> float:
    """max |f_b(x) - f_a(x)| / max |f_a(x)| on one batch, in float64: how much a transform changed the function.

    f is log_softmax over dim 1 of the outputs (loss="cross_entropy", what a softmax loss sees: translations
    leave it unchanged) or the raw outputs (loss="mse"). Both models run on float64 copies with normalisation
    eps set negligible (as in certification: eps breaks scale symmetry by ~eps / var), in their own train/eval
    mode, under the same RNG seed (same dropout masks). Float64 rounding gives ~1e-15.
    """
    outs = []
    for m in (model_a, model_b):
        work, _ = working_copy(m, torch.float64)
        args = cast_inputs(as_args(inputs), torch.float64, model_device(m))
        with torch.no_grad(), fixed_rng(seed, model_device(m)):
            out = work(*args)
        if not isinstance(out, Tensor):
            raise SymmetryUseError(f"the model returns {type(out).__name__}, not a tensor",
                                   "compare models that return their logits")
        outs.append(torch.log_softmax(out, dim=1) if loss == "cross_entropy" else out)
    scale = float(outs[0].abs().max())
    return float((outs[1] - outs[0]).abs().max()) / max(scale, torch.finfo(torch.float64).tiny)
