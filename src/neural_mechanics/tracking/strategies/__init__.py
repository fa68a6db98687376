"""Optimizer strategies of the tracker, one module per optimizer family, registered by optimizer class.

    sgd.py            torch.optim.SGD and subclasses keeping SGD.step: exact, breaking and paper predictions
    identity.py       the base of the next four: the exact step identity, the equilibrium columns
    adam.py           torch.optim.Adam / AdamW         rmsprop.py  torch.optim.RMSprop
    lion.py           lion_pytorch.Lion (optional)     muon.py     torch.optim.Muon
    any_optimizer.py  every other torch.optim.Optimizer: measured charges and the optimizer's breaking term

To add a family, write a `Strategy` subclass in one module and decorate it with `@register_strategy(OptimizerClass)`
(`registry.py`); importing the module registers it (the built-in ones are imported here).
"""

from neural_mechanics.tracking.strategies import adam, any_optimizer, identity, lion, muon, rmsprop, sgd
from neural_mechanics.tracking.strategies.base import Applies, StepContext, Strategy, StrategySetup
from neural_mechanics.tracking.strategies.registry import register_strategy, registered, strategy_for

__all__ = ["Applies", "StepContext", "Strategy", "StrategySetup", "adam", "any_optimizer", "identity", "lion", "muon",
           "register_strategy", "registered", "rmsprop", "sgd", "strategy_for"]
