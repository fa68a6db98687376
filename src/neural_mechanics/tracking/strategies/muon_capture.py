"""Keep the Newton-Schulz outputs torch's Muon step computes, so the tracker reads u_k instead of recomputing it.

torch's Muon step (`torch/optim/_muon.py`, `_single_tensor_muon`) walks the parameters with a gradient, param group
by param group in `group["params"]` order (`Muon._init_group`), and calls the module-level
`_zeropower_via_newtonschulz(z_k, ...)` once per parameter, looked up by name at call time. Between the tracker's
step pre hook and its post hook `NewtonSchulzCapture` puts a wrapper under that name which calls whatever was there
before (the original, or a user's own replacement: the step's numbers do not change) and keeps the output of each
call whose parameter is tracked. At the post hook the outputs are matched to the parameters in the step's order;
the match is used only when it is complete and consistent (as many calls as parameters with a gradient, each
output of its parameter's shape); otherwise (another torch build, a compiled or foreach step, a call from
elsewhere) nothing is used and the strategy recomputes u_k from the momentum buffer, as it did before.

Memory: the outputs of the tracked matrices (bfloat16: half a float32 copy of them) are held from the step until
the post hook, instead of one matrix at a time. A step that raises leaves the wrapper in place, calling through and
keeping at most one step's outputs; the next pre hook (or `close`) takes it out again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NewtonSchulzCapture"]

_NAME = "_zeropower_via_newtonschulz"

try:
    _MODULE: Any = importlib.import_module("torch.optim._muon")
except ImportError:  # pragma: no cover - a torch without Muon
    _MODULE = None


def _no_function(*args: Any, **kwargs: Any) -> Tensor:  # pragma: no cover - replaced before any install
    raise RuntimeError("Newton-Schulz capture used before it was started")


class _Wrapper:
    """Calls `inner` and hands each output to `capture.keep` (marked so a stale one is recognised and unwrapped)."""

    def __init__(self, inner: Callable[..., Tensor], capture: NewtonSchulzCapture):
        self.inner, self.capture = inner, capture

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.inner(*args, **kwargs)
        self.capture.keep(out)
        return out


class NewtonSchulzCapture:
    """The outputs of torch's Newton-Schulz calls during one Muon step, per tracked parameter (module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tracked: Iterable[nn.Parameter]):
        self.optimizer = optimizer
        self.tracked = {id(p) for p in tracked}
        self.order: list[nn.Parameter] = []
        """The parameters the step will call Newton-Schulz for, in its order."""
        self.outputs: list[Tensor | None] = []
        self.calls = 0
        self._wrapper = _Wrapper(_no_function, self)
        """One wrapper object for every step (what torch's module holds during a step keeps one identity)."""
        self._installed = False

    @staticmethod
    def available() -> bool:
        return _MODULE is not None and callable(getattr(_MODULE, _NAME, None))

    def start(self) -> None:
        """At the step pre hook: install the wrapper over what is there now (unwrapping a stale one of ours)."""
        self.discard()
        self.order = [p for pg in self.optimizer.param_groups for p in pg["params"] if p.grad is not None]
        if not self.available():
            return
        current = getattr(_MODULE, _NAME)
        while isinstance(current, _Wrapper):  # left by a step that raised (ours or another tracker's)
            current = current.inner
        self._wrapper.inner = current
        setattr(_MODULE, _NAME, self._wrapper)
        self._installed = True

    def keep(self, out: Tensor) -> None:
        i = self.calls
        self.calls += 1
        if i < len(self.order):  # beyond the step's count the match fails anyway: keep nothing more
            self.outputs.append(out if id(self.order[i]) in self.tracked else None)

    def stop(self) -> None:
        """Take the wrapper out (only if it is still the one installed: a later patch on top stays)."""
        if self._installed and getattr(_MODULE, _NAME, None) is self._wrapper:
            setattr(_MODULE, _NAME, self._wrapper.inner)
        self._installed = False

    def finish(self) -> dict[int, Tensor]:
        """At the post hook: stop, and return {id(param): output} when the match is complete, else {}."""
        order, outputs, calls = self.order, self.outputs, self.calls
        self.discard()
        if calls != len(order):  # one output was kept (or None) per call up to len(order)
            return {}
        kept: dict[int, Tensor] = {}
        for p, out in zip(order, outputs, strict=True):
            if out is None:
                continue
            if out.shape != p.shape:
                return {}
            kept[id(p)] = out
        return kept

    def discard(self) -> None:
        """Take the wrapper out and drop what was kept (between steps, and when the tracker closes)."""
        self.stop()
        self.order, self.outputs, self.calls = [], [], 0
