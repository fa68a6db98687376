"""Putting certified symmetries to work: parameter groups, transforms along the orbits, completeness.

This layer sits above `symmetry/` (it reads `Symmetry` groups, their actions and generators, and compiles
them with the incidence kernel) and below `experiments/` and the CLI. One concept per module:

- `orbits`: the shared kernel (colour classes of disjoint groups, per-group sums and maxima, moving along
  the orbit, over-relaxation);
- `param_groups` / `heuristics`: torch.optim param groups from the scale-invariant parameters, and where
  the timm / nanoGPT / per-row recipes disagree with them;
- `transforms` (`act`), `balance`, `equalize` (+ `quantize`), `alignment` (`distance_up_to_symmetry`):
  moves along the orbits, each leaving the function unchanged;
- `completeness`: the output Jacobian's null space against the span of the detected generators.
"""

from neural_mechanics.uses.alignment import Alignment, distance_up_to_symmetry
from neural_mechanics.uses.balance import balance, imbalance
from neural_mechanics.uses.completeness import Completeness, completeness
from neural_mechanics.uses.equalize import channel_ranges, equalize
from neural_mechanics.uses.heuristics import RULES, disagreements
from neural_mechanics.uses.orbits import SymmetryUseError
from neural_mechanics.uses.param_groups import ParamSplit, classify_parameters, param_groups
from neural_mechanics.uses.quantize import fold_batchnorm, quantization_error, quantize_weights
from neural_mechanics.uses.transforms import act

__all__ = [
    "RULES",
    "Alignment",
    "Completeness",
    "ParamSplit",
    "SymmetryUseError",
    "act",
    "balance",
    "channel_ranges",
    "classify_parameters",
    "completeness",
    "disagreements",
    "distance_up_to_symmetry",
    "equalize",
    "fold_batchnorm",
    "imbalance",
    "param_groups",
    "quantization_error",
    "quantize_weights",
]
