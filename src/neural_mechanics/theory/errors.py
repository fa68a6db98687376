"""The theory layer's own error: bad input to a recurrence, a prediction model or a hyperparameter reader.

`theory/` sits below the tracker and knows nothing about it; callers above (the tracker, the plots) let a
`TheoryError` through unchanged: it is an `NMechError`, so the CLI prints it without a traceback.
"""

from __future__ import annotations

from neural_mechanics.errors import NMechError

__all__ = ["TheoryError"]


class TheoryError(NMechError):
    """A theory function got input it cannot work with (a param_group without 'lr', an unknown option, ...)."""
