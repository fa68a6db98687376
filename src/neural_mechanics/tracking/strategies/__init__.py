"""Optimizer strategies of the tracker, one module per optimizer family, registered by optimizer class.

    sgd.py            torch.optim.SGD and subclasses keeping SGD.step: exact, breaking and paper predictions
    any_optimizer.py  every other torch.optim.Optimizer: measured charges and the optimizer's breaking term

To add a family, write a `Strategy` subclass in one module and decorate it with `@register_strategy(OptimizerClass)`
(`registry.py`); importing the module registers it (the built-in ones are imported here).
"""

from neural_mechanics.tracking.strategies import any_optimizer, sgd
from neural_mechanics.tracking.strategies.base import Applies, StepContext, Strategy, StrategySetup
from neural_mechanics.tracking.strategies.registry import register_strategy, registered, strategy_for

__all__ = ["Applies", "StepContext", "Strategy", "StrategySetup", "any_optimizer", "register_strategy",
           "registered", "sgd", "strategy_for"]
