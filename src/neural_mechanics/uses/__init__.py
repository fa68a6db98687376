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

The public functions are exported from the top level (`nm.param_groups`, `nm.balance`, ...); they are not
re-exported here, where several would shadow the submodule of the same name (`uses.balance` and so on).
"""
