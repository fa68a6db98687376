"""Common weight-decay recipes, as data, and where they disagree with the certified split.

Each recipe guesses from shapes and names which parameters should be decayed, as a proxy for "the
parameter is (part of) a normalised weight, so decay only sets its effective learning rate". The three
rules, written out (one line each, no dependency on the libraries that ship them):

* timm (`timm.optim.param_groups_weight_decay`): no decay when `param.ndim <= 1` or the name ends in
  ".bias"; decay otherwise.
* nanoGPT (`GPT.configure_optimizers`): decay when `param.dim() >= 2`, none otherwise.
* rotational rows (rotational optimizers and per-row update normalisation, e.g. the per-neuron units of
  Kosson et al. 2024): every row of every matrix (ndim >= 2) is a scale-invariant unit of its own.

A decay rule disagrees with the certified split (`classify_parameters`) on a parameter when it decays one
that is not scale-invariant (there decay changes the function, not only the effective learning rate) or
exempts one that is (its scale group then decays unevenly, which is no group action: with a conv bias
before BatchNorm exempted and the conv weight decayed, the per-channel scale symmetry is broken by the
optimizer). The rows rule disagrees where it claims per-row units that are not (a classifier, the columns of
a ViT stream, attention projections) or misses ones that are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from neural_mechanics.uses.param_groups import ParamInfo, ParamSplit

__all__ = ["RULES", "Disagreement", "Rule", "disagreements"]


@dataclass(frozen=True)
class Rule:
    """A shape/name recipe: `claims(name, shape)` is its answer for one parameter."""

    name: str
    source: str
    says: str
    """What a True answer means: "decay" or "per-row scale-invariant"."""
    claims: Callable[[str, tuple[int, ...]], bool]
    description: str


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("timm", "timm.optim.param_groups_weight_decay", "decay",
             lambda name, shape: not (len(shape) <= 1 or name.endswith(".bias")),
             "no decay for ndim <= 1 and biases"),
        Rule("nanogpt", "nanoGPT GPT.configure_optimizers", "decay",
             lambda name, shape: len(shape) >= 2,
             "decay iff dim() >= 2"),
        Rule("rows", "rotational optimizers (per-row units)", "per-row scale-invariant",
             lambda name, shape: len(shape) >= 2,
             "every row of every matrix is scale-invariant"),
    )
}


@dataclass(frozen=True)
class Disagreement:
    """One parameter on which a rule's answer differs from the certified split."""

    rule: str
    param: str
    rule_says: bool
    certified: bool
    why: str


def _certified(rule: Rule, info: ParamInfo) -> bool:
    """The certified answer to the rule's question."""
    if rule.says == "decay":
        return info.scale_invariant
    return info.scale_invariant and info.unit == "rows"


def _why(rule: Rule, info: ParamInfo, claim: bool) -> str:
    if rule.says == "decay":
        if claim:
            return "decayed, not scale-invariant: decay changes the function"
        return "exempt, yet scale-invariant: its scale group is decayed unevenly"
    if claim:
        if info.scale_invariant:
            return f"rows are no separate units: scale-invariant {info.unit}"
        return "rows are not scale-invariant"
    return "misses per-row units: each row is a certified scale group"


def disagreements(split: ParamSplit, rules: dict[str, Rule] | None = None) -> list[Disagreement]:
    """Every (rule, parameter) where the rule's answer differs from the certified split, in model order."""
    out = []
    for rule in (rules or RULES).values():
        for info in split.params:
            claim = bool(rule.claims(info.name, info.shape))
            cert = _certified(rule, info)
            if claim != cert:
                out.append(Disagreement(rule.name, info.name, claim, cert, _why(rule, info, claim)))
    return out
