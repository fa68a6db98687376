"""User-facing errors: each says what happened and what to do about it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NMechError(Exception):
    """Base class for errors caused by the user's input, not by a bug in this package."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what}\n  what to do: {fix}")


class CaptureError(NMechError):
    """The model (plus loss) could not be captured as a computation graph."""


class LossSpecError(CaptureError):
    """A loss argument is not one of the accepted forms, or does not fit the model's outputs.

    A subclass of CaptureError because `find_symmetries` raised CaptureError for a bad loss before the
    three entry points shared one loss specification (symmetry/loss.py); handlers of either still catch it.
    """


class ModelSpecError(NMechError):
    """A MODEL argument (`torchvision:NAME`, `package.module:factory`, preset) could not be resolved."""


class InputShapeError(NMechError):
    """The example input does not fit the model."""


class DatasetError(NMechError):
    """A dataset directory is missing or not in the expected layout."""


class ConfigError(NMechError):
    """A training config has unknown keys or values of the wrong type."""


class RunStoreError(NMechError):
    """A run directory is missing, unreadable, corrupt, or cannot be written."""


class TrackerError(NMechError):
    """The tracker cannot be attached as asked (unsupported optimizer setup, sharded model, ...)."""
