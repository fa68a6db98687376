"""The three symmetry kinds of Neural Mechanics, as data.

Each kind fixes how a group of parameter coordinates A moves under the group action, what the
infinitesimal generator xi(theta) is, and which quantity ("charge") gradient flow conserves
(docs/theory.md section 1):

| kind        | action psi(theta, alpha)            | generator xi(theta)      | charge                          |
|-------------|-------------------------------------|--------------------------|---------------------------------|
| translation | theta + alpha 1_A                   | 1_A                      | T = <theta, 1_A>                |
| scale       | alpha theta_A (alpha > 0)           | theta_A                  | S = |theta_A|^2                 |
| rescale     | alpha theta_A1, theta_A2 / alpha    | theta_A1 - theta_A2      | R = |theta_A1|^2 - |theta_A2|^2 |

Quadratic charges are written C = <theta, D theta> with D = +1 on A (scale), +1 on A1 and -1 on A2
(rescale); the translation charge is linear. Everything downstream (certification, constraint
checks, tracking) reads these facts from here instead of branching on strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KindName = Literal["translation", "scale", "rescale"]


@dataclass(frozen=True)
class Kind:
    """Static facts about one symmetry kind."""

    name: KindName
    action: str
    generator: str
    charge: str
    quadratic: bool
    """True when the charge is <theta, D theta>; False for the linear translation charge."""
    signed_roles: bool
    """True when members carry a role ("in" = A1, sign +1; "out" = A2, sign -1)."""
    source: str
    """Where such symmetries come from in a network."""


KINDS: dict[str, Kind] = {
    "translation": Kind(
        name="translation",
        action="theta + alpha 1_A",
        generator="1_A",
        charge="T = <theta, 1_A>",
        quadratic=False,
        signed_roles=False,
        source="parameters whose effect on the logits is a per-sample constant shift before a softmax",
    ),
    "scale": Kind(
        name="scale",
        action="alpha theta_A, alpha > 0",
        generator="theta_A",
        charge="S = |theta_A|^2",
        quadratic=True,
        signed_roles=False,
        source="parameters that write into a normalised quantity (train-mode BatchNorm, LayerNorm, ...)",
    ),
    "rescale": Kind(
        name="rescale",
        action="alpha theta_A1, theta_A2 / alpha, alpha > 0",
        generator="theta_A1 - theta_A2",
        charge="R = |theta_A1|^2 - |theta_A2|^2",
        quadratic=True,
        signed_roles=True,
        source="a neuron behind a positively homogeneous map: A1 writes it, A2 reads it",
    ),
}


def get_kind(name: str) -> Kind:
    """Look a kind up by name, with an error that lists the valid names."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown symmetry kind {name!r}; expected one of {sorted(KINDS)}") from None
