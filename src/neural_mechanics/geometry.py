"""Deprecated alias: the constraint checks moved to `neural_mechanics.constraints`.

`nm.check_constraints` and `nm.ConstraintReport` are unchanged. This module keeps old imports
(`from neural_mechanics.geometry import check_constraints`, ...) working for one deprecation cycle:
each name is looked up where it lives now and a DeprecationWarning names the new place.

    check_constraints, ConstraintReport, GroupConstraint, GRAD_FLOOR -> neural_mechanics.constraints
    working_copy, as_args, cast_inputs, ... (the float64 working copy) -> neural_mechanics.symmetry.utils
    GroupIncidence                                                      -> neural_mechanics.symmetry.incidence
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

from neural_mechanics import constraints
from neural_mechanics.symmetry import incidence, utils

_MOVED: dict[str, ModuleType] = {
    **{name: constraints for name in constraints.__all__},
    **{name: utils for name in utils.__all__},
    "GroupIncidence": incidence,
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"neural_mechanics.geometry is deprecated: import {name} from {module.__name__}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(_MOVED)
