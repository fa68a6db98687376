"""Optimizer class -> strategy: the registry the tracker asks which strategy runs a given optimizer.

    @register_strategy(torch.optim.SGD)
    class SGDStrategy(Strategy): ...

`strategy_for(optimizer)` walks the optimizer's class MRO (its class, then its bases) and returns the first
registered strategy that `accepts` the optimizer; a subclass therefore gets its base class's strategy unless it
changes what the strategy relies on (e.g. a subclass of SGD that overrides `step` is not SGD's update rule any
more: SGDStrategy declines it and the search goes on to `torch.optim.Optimizer`, whose strategy measures without
predicting). Registering a strategy for a class replaces the previous one for that class (later wins), so a
user's module can register a strategy for their own optimizer, or override a built-in one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neural_mechanics.errors import TrackerError
from neural_mechanics.tracking.strategies.base import Strategy

__all__ = ["register_strategy", "registered", "strategy_for"]

_REGISTRY: dict[type, type[Strategy]] = {}


def register_strategy(optimizer_cls: type) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: run `optimizer_cls` (and subclasses the strategy accepts) with the decorated strategy."""
    if not isinstance(optimizer_cls, type):
        raise TypeError(f"register_strategy takes an optimizer class, got {optimizer_cls!r}")

    def deco(strategy: type[Strategy]) -> type[Strategy]:
        _REGISTRY[optimizer_cls] = strategy
        return strategy

    return deco


def registered() -> dict[type, type[Strategy]]:
    """A copy of the registry: optimizer class -> strategy class."""
    return dict(_REGISTRY)


def strategy_for(optimizer: torch.optim.Optimizer) -> type[Strategy]:
    """The strategy for `optimizer`: the first registered one along its class MRO that accepts it."""
    for cls in type(optimizer).__mro__:
        strategy = _REGISTRY.get(cls)
        if strategy is not None and strategy.accepts(optimizer):
            return strategy
    raise TrackerError(f"no tracker strategy for optimizer {type(optimizer).__name__}",
                       "pass a torch.optim.Optimizer (every torch.optim.Optimizer is tracked, at least measured)")
