"""`param_groups`: torch.optim parameter groups that separate scale-invariant parameters from the rest.

Why: for a parameter whose every entry lies in a scale group (e.g. a conv followed by train-mode BatchNorm),
the loss does not depend on its norm; weight decay there does not regularise the function, it only shrinks
the norm and so sets the effective learning rate eta / |theta_A|^2 (docs/theory.md sections 3 and 6,
rotational equilibrium). Elsewhere (biases, normalisation gains, a classifier) decay changes the function.
Common recipes guess the split from shapes and names; this module reads it from certified symmetries.

Definition (`classify_parameters`). A trainable parameter is scale-invariant when

1. every one of its entries lies in some scale group (a parameter only partly covered is not);
2. every scale group that touches it lies entirely inside scale-invariant parameters (closure: the groups
   never straddle the boundary between param groups); and
3. no entry of it lies in two scale groups (then the groups' supports tile the scale-invariant set, and
   decaying the whole set by one factor is the composition of every group's scale action with that factor).

Together these make "multiply every scale-invariant parameter by the same c" (what coupled or decoupled
weight decay does to a param group each step) a symmetry, so the split is sound for any optimizer that
treats the param group uniformly. Parameters failing 2 or 3 are reported with the reason and left with the
rest.

What parameter-level invariance means when a group spans several parameters: on vit_b_16 the only scale
group is the pre-LayerNorm residual stream as a whole (patch embedding, class token, positions, every
attention output projection and MLP output layer): by the definition each of those parameters is
scale-invariant, but only *jointly*: scaling one of them alone changes the function. Uniform weight decay on
the whole param group is fine (it scales the whole stream at once); a per-tensor trust ratio (LARS, LAMB) or
a rotational optimizer that treats every row of every matrix as its own rotating unit is not, because the
unit is the stream, not a row. `ParamInfo.unit` says which: "rows" (each dim-0 slice is its own group, as for
a conv before BatchNorm), "tensor" (the whole tensor is one group), "joint with N parameters", or "slices".

Translation-invariant parameters (every entry in a translation group, e.g. a classifier before a softmax)
can be given a group of their own (`exclude_translation=True`, weight decay 0 unless overridden): the
softmax ignores their conserved sum, which weight decay otherwise drives to 0 at rate lambda.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.uses.orbits import SymmetryUseError

__all__ = ["ParamInfo", "ParamSplit", "classify_parameters", "param_groups"]

SCALE_GROUP = "scale_invariant"
TRANSLATION_GROUP = "translation_invariant"
OTHER_GROUP = "other"


@dataclass(frozen=True)
class ParamInfo:
    """How one trainable parameter relates to the certified groups."""

    name: str
    shape: tuple[int, ...]
    scale_invariant: bool
    translation_invariant: bool
    """Every entry lies in a translation group."""
    unit: str
    """For scale-invariant parameters: "rows", "tensor", "joint with N parameters" or "slices"; else "-"."""
    reason: str
    """Why a parameter touched by scale groups is not scale-invariant ("" otherwise)."""
    scale_groups: int
    """Number of scale groups touching the parameter."""


@dataclass(frozen=True)
class ParamSplit:
    """`classify_parameters`' answer: one ParamInfo per trainable parameter, in model order."""

    params: tuple[ParamInfo, ...]

    def __getitem__(self, name: str) -> ParamInfo:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no trainable parameter named {name!r}")

    @property
    def scale_invariant(self) -> list[str]:
        return [p.name for p in self.params if p.scale_invariant]

    @property
    def translation_invariant(self) -> list[str]:
        return [p.name for p in self.params if p.translation_invariant and not p.scale_invariant]


def _coverage(groups: list[Symmetry], shapes: Mapping[str, Tensor]) -> dict[str, tuple[bool, bool]]:
    """Per touched parameter: (every entry covered by some group, some entry covered by two or more)."""
    if not groups:
        return {}
    inc = GroupIncidence(groups, shapes, error=SymmetryUseError)
    counts = inc.expand(torch.ones(len(groups), dtype=torch.float64), signed=False, dtype=torch.float32)
    return {n: (bool((c >= 1).all()), bool((c >= 2).any())) for n, c in counts.items()}


def _whole(m: Member, shape: tuple[int, ...]) -> bool:
    """True when the member selects every entry of a tensor of this shape."""
    if m.dim is None:
        return True
    return m.sub_dim is None and m.index is not None and len(set(m.index)) == shape[m.dim]


def _unit(name: str, shape: tuple[int, ...], groups: list[Symmetry]) -> str:
    members = [m for g in groups for m in g.members if m.param == name]
    params = {p for g in groups for p in g.params}
    if any(_whole(m, shape) for m in members):
        if len(params) > 1:
            return f"joint with {len(params) - 1} other parameter{'s' if len(params) > 2 else ''}"
        return "tensor"
    if all(m.dim == 0 and m.sub_dim is None and m.index is not None and len(m.index) == 1 for m in members):
        return "rows"
    return "slices"


def classify_parameters(model: nn.Module, symmetries: Iterable[Symmetry]) -> ParamSplit:
    """Which trainable parameters are scale-invariant (module docstring) and translation-invariant.

    symmetries: certified groups of `model` (e.g. `nm.find_symmetries` then `nm.certify`); only scale and
    translation groups are used.
    """
    syms = list(symmetries)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    scale = [s for s in syms if s.kind == "scale"]
    unknown = sorted({p for s in syms for p in s.params} - set(dict(model.named_parameters())))
    if unknown:
        raise SymmetryUseError(f"the symmetries name parameters the model does not have: {unknown[:5]}",
                               "pass the symmetries found on this model (nm.find_symmetries(model, inputs))")
    frozen = {s.name for s in scale if not all(p in trainable for p in s.params)}
    scale = [s for s in scale if s.name not in frozen]
    cover = _coverage(scale, trainable)
    trans_cover = _coverage([s for s in syms if s.kind == "translation" and all(p in trainable for p in s.params)],
                            trainable)
    by_param: dict[str, list[Symmetry]] = {}
    for s in scale:
        for pname in s.params:
            by_param.setdefault(pname, []).append(s)

    reasons: dict[str, str] = {}
    for n in trainable:
        full, overlap = cover.get(n, (False, False))
        if n not in cover:
            continue
        if not full:
            reasons[n] = "only part of its entries lie in scale groups"
        elif overlap:
            reasons[n] = "some entries lie in two scale groups (their supports do not tile it)"
    changed = True
    while changed:  # closure: a group that touches a non-invariant parameter disqualifies all its parameters
        changed = False
        for s in scale:
            bad = [pname for pname in s.params if pname in reasons]
            if not bad:
                continue
            for pname in s.params:
                if pname not in reasons:
                    reasons[pname] = f"shares scale group {s.name!r} with {bad[0]!r}, which is not scale-invariant"
                    changed = True
    infos = []
    for n, p in trainable.items():
        si = n in cover and n not in reasons
        infos.append(ParamInfo(
            name=n, shape=tuple(p.shape), scale_invariant=si,
            translation_invariant=trans_cover.get(n, (False, False))[0],
            unit=_unit(n, tuple(p.shape), by_param.get(n, [])) if si else "-",
            reason=reasons.get(n, ""), scale_groups=len(by_param.get(n, [])),
        ))
    return ParamSplit(tuple(infos))


def param_groups(model: nn.Module, symmetries: Iterable[Symmetry], weight_decay: float = 0.0, *,
                 scale_invariant: Mapping[str, Any] | None = None, exclude_translation: bool = False,
                 translation_invariant: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Param groups for any torch.optim optimizer: [{"name": "scale_invariant", "params": [...], ...},
    ({"name": "translation_invariant", ...},) {"name": "other", ...}].

    weight_decay: the decay of every group unless overridden. scale_invariant: extra hyperparameters of the
    scale-invariant group (e.g. {"weight_decay": 5e-4, "lr": 0.1}: its decay only sets its effective learning
    rate). exclude_translation: move parameters whose every entry lies in a translation group (and that are
    not scale-invariant) into "translation_invariant", with weight_decay 0 unless `translation_invariant`
    says otherwise. Frozen parameters (requires_grad=False) are left out. Every group is present, possibly
    empty, so that `name` lookups never fail. See the module docstring for the definition.
    """
    for label, extra in (("scale_invariant", scale_invariant), ("translation_invariant", translation_invariant)):
        if extra and {"params", "name"} & set(extra):
            raise SymmetryUseError(f"{label}= may not set 'params' or 'name'",
                                   "pass only hyperparameters there, e.g. {'weight_decay': 5e-4, 'lr': 0.1}")
    split = classify_parameters(model, symmetries)
    own = dict(model.named_parameters())
    si = set(split.scale_invariant)
    ti = set(split.translation_invariant) if exclude_translation else set()
    groups: list[dict[str, Any]] = [
        {"name": SCALE_GROUP, "params": [own[n] for n in own if n in si], "weight_decay": weight_decay,
         **dict(scale_invariant or {})},
    ]
    if exclude_translation:
        groups.append({"name": TRANSLATION_GROUP, "params": [own[n] for n in own if n in ti], "weight_decay": 0.0,
                       **dict(translation_invariant or {})})
    rest = [own[n] for n in own if own[n].requires_grad and n not in si and n not in ti]
    groups.append({"name": OTHER_GROUP, "params": rest, "weight_decay": weight_decay})
    return groups
