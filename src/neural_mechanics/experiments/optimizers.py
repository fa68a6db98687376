"""The optimizers `nmech train` can build: a registry of specs, one entry per optimizer.

An `OptimizerSpec` names a stock optimizer (its class, or any builder called the same way,
`factory(params, **kwargs)`), the `OptimizerConfig` keys it takes (passed on as keyword arguments of the
same name, so `optimizer.momentum` becomes `momentum=`), and how its config is validated. The optimizer is
never wrapped or forked: the tracker attaches to its step hooks.

Adding an optimizer is one registration, e.g. for torch.optim.Adagrad

    register_optimizer(OptimizerSpec("adagrad", torch.optim.Adagrad, keys=("lr", "eps", "weight_decay"),
                                     description="torch.optim.Adagrad"))

after which `optimizer: {name: adagrad, lr: 0.01}` is a valid config section. A spec without its own
`validate` refuses every key it does not take that is set away from its default (`refuse_unused_keys`: so
`--set optimizer=adagrad` on a config with momentum 0.9 is an error, not a silently different experiment). An
optimizer from an optional package registers a builder that imports the package, and a `validate` that says
how to install it when it is missing (so the config fails before the run starts) and then calls
`refuse_unused_keys` (lion does this: lion-pytorch is an optional extra). The four original specs keep the
rules they always had (sgd tolerates adam's betas, and so on), so every existing config means what it meant; lion
and muon (torch.optim.Muon: matrices only, refused with a ConfigError for other parameters) refuse unused keys.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from neural_mechanics.errors import ConfigError
from neural_mechanics.experiments.schema import changed_fields, check


@dataclass(frozen=True)
class OptimizerConfig:
    """The `optimizer` section of a training config. `name` is a registered optimizer (`optimizer_names()`);
    which of the other keys it reads is its spec's `keys` (momentum/dampening/nesterov: sgd, momentum also
    rmsprop and muon, nesterov also muon; betas/eps: adam/adamw, betas also lion; alpha/eps: rmsprop)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99

    def __post_init__(self) -> None:
        get_optimizer(self.name)  # an unknown name fails where a wrongly typed value would


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: `factory(params, **{key: cfg.key for key in keys})` builds it.

    validate(cfg) raises ConfigError (with what to do) for a config section this optimizer cannot honour; None
    means `refuse_unused_keys`: every OptimizerConfig key outside `keys` (and `name`) must keep its default.
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    keys: tuple[str, ...]
    description: str = ""
    validate: Callable[[OptimizerConfig], None] | None = None

    def kwargs(self, cfg: OptimizerConfig) -> dict[str, Any]:
        """The keyword arguments the factory gets: the values of this spec's keys in `cfg`."""
        return {k: getattr(cfg, k) for k in self.keys}

    def build(self, cfg: OptimizerConfig, params: Any) -> torch.optim.Optimizer:
        """The optimizer over `params` with the hyperparameters of `cfg`."""
        return self.factory(params, **self.kwargs(cfg))

    def check(self, cfg: OptimizerConfig) -> None:
        """Run `validate`, or (without one) `refuse_unused_keys`."""
        if self.validate is not None:
            self.validate(cfg)
        else:
            self.refuse_unused_keys(cfg)

    def refuse_unused_keys(self, cfg: OptimizerConfig) -> None:
        """ConfigError when a key outside `keys` (and `name`) is set away from its default: it would be ignored."""
        unused = changed_fields(cfg, ("name", *self.keys))
        if unused:
            raise ConfigError(f"optimizer.{unused[0]}: {self.name} does not take {', '.join(unused)}",
                              f"remove {', '.join('optimizer.' + k for k in unused)} (or set them to their "
                              f"defaults); {self.name} takes {', '.join(self.keys)}")


#: The registry, in registration order (the order error messages list names in).
OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Add `spec` to the registry (ValueError if its name is taken, unless replace=True); returns it."""
    if spec.name in OPTIMIZERS and not replace:
        raise ValueError(f"an optimizer called {spec.name!r} is already registered (pass replace=True)")
    unknown = [k for k in spec.keys if k not in OptimizerConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"optimizer spec {spec.name!r} takes keys OptimizerConfig does not have: {unknown}")
    OPTIMIZERS[spec.name] = spec
    return spec


def optimizer_names() -> tuple[str, ...]:
    """The registered optimizer names, in registration order."""
    return tuple(OPTIMIZERS)


def get_optimizer(name: str) -> OptimizerSpec:
    """The spec registered as `name`; ConfigError (with close matches) if there is none."""
    spec = OPTIMIZERS.get(name)
    if spec is None:
        names = optimizer_names()
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"optimizer.name: expected {' | '.join(repr(n) for n in names)}, got {name!r}",
                          f"{hint}set optimizer.name to one of: {', '.join(names)}")
    return spec


def validate_optimizer(cfg: OptimizerConfig) -> None:
    """The value checks of the optimizer section: ranges shared by every optimizer, then the spec's own rules."""
    check(cfg.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.lr}", "use a positive learning rate")
    check(cfg.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {cfg.weight_decay}", "use 0 for off")
    check(0 <= cfg.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {cfg.momentum}", "e.g. 0.9")
    check(0 <= cfg.dampening <= 1, "optimizer.dampening", f"must be in [0, 1], got {cfg.dampening}", "usually 0")
    get_optimizer(cfg.name).check(cfg)


def build_optimizer(cfg: OptimizerConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over `params` (no wrapper, no fork: the tracker uses its hooks)."""
    return get_optimizer(cfg.name).build(cfg, params)


# -- the built-in optimizers and their rules ------------------------------------------------------


def _no_nesterov_unless_sgd(cfg: OptimizerConfig) -> None:
    """torch.optim.SGD's rule: Nesterov momentum needs momentum > 0 and no dampening (and only SGD has it)."""
    if cfg.nesterov:
        check(cfg.name == "sgd" and cfg.momentum > 0 and cfg.dampening == 0, "optimizer.nesterov",
              "Nesterov momentum needs sgd with momentum > 0 and dampening 0 (torch.optim.SGD's rule)",
              "set optimizer.momentum (e.g. 0.9) and dampening 0, or nesterov false")


def _validate_adam(cfg: OptimizerConfig) -> None:
    check(cfg.momentum == 0 and cfg.dampening == 0 and not cfg.nesterov, "optimizer.momentum",
          f"{cfg.name} has no momentum/dampening/nesterov (its momentum is betas[0])",
          "remove them and set optimizer.betas instead")
    check(all(0 <= b < 1 for b in cfg.betas), "optimizer.betas", f"must be in [0, 1), got {cfg.betas}",
          "e.g. [0.9, 0.999]")


def _validate_rmsprop(cfg: OptimizerConfig) -> None:
    _no_nesterov_unless_sgd(cfg)
    check(cfg.dampening == 0, "optimizer.dampening", "rmsprop has no dampening", "remove it")


LION_HINT = "pip install 'neural-mechanics[lion]' (or: pip install lion-pytorch)"


def _validate_lion(cfg: OptimizerConfig) -> None:
    """lion needs the optional lion-pytorch package: say how to install it before the run starts."""
    if importlib.util.find_spec("lion_pytorch") is None:
        raise ConfigError("optimizer.name: lion needs the lion-pytorch package, which is not installed", LION_HINT)
    check(all(0 <= b <= 1 for b in cfg.betas), "optimizer.betas", f"must be in [0, 1], got {cfg.betas}",
          "e.g. [0.9, 0.99] (Lion's defaults)")
    get_optimizer("lion").refuse_unused_keys(cfg)


def _build_lion(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    # lion-pytorch is an optional extra, imported only when a Lion is built (`_validate_lion` has checked it)
    from lion_pytorch import Lion

    return Lion(params, **kwargs)


def _validate_muon(cfg: OptimizerConfig) -> None:
    check(cfg.dampening == 0, "optimizer.dampening", "muon has no dampening", "remove it")
    get_optimizer("muon").refuse_unused_keys(cfg)


def _build_muon(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """torch.optim.Muon over `params`, which must all be matrices (torch's Muon refuses anything else)."""
    params = list(params)
    others = [tuple(p.shape) for p in params if p.ndim != 2]
    if others:
        raise ConfigError(f"optimizer.name: torch.optim.Muon trains 2-D parameters only, and this model has "
                          f"{len(others)} others (shapes {', '.join(map(str, others[:4]))}"
                          f"{', ...' if len(others) > 4 else ''}: biases, norms, convolutions)",
                          "use a model whose trainable parameters are all matrices (preset mlp-bn-matrices), "
                          "or optimizer.name adamw")
    return torch.optim.Muon(params, **kwargs)


register_optimizer(OptimizerSpec(
    "sgd", torch.optim.SGD, keys=("lr", "momentum", "dampening", "nesterov", "weight_decay"),
    description="torch.optim.SGD (heavy-ball or Nesterov momentum, dampening, coupled weight decay)",
    validate=_no_nesterov_unless_sgd))
register_optimizer(OptimizerSpec(
    "adam", torch.optim.Adam, keys=("lr", "betas", "eps", "weight_decay"),
    description="torch.optim.Adam (L2 weight decay added to the gradient)", validate=_validate_adam))
register_optimizer(OptimizerSpec(
    "adamw", torch.optim.AdamW, keys=("lr", "betas", "eps", "weight_decay"),
    description="torch.optim.AdamW (decoupled weight decay)", validate=_validate_adam))
register_optimizer(OptimizerSpec(
    "rmsprop", torch.optim.RMSprop, keys=("lr", "alpha", "eps", "momentum", "weight_decay"),
    description="torch.optim.RMSprop (optionally with momentum)", validate=_validate_rmsprop))
register_optimizer(OptimizerSpec(
    "lion", _build_lion, keys=("lr", "betas", "weight_decay"),
    description="lion_pytorch.Lion (sign updates, decoupled weight decay; optional: " + LION_HINT + ")",
    validate=_validate_lion))
if hasattr(torch.optim, "Muon"):
    register_optimizer(OptimizerSpec(
        "muon", _build_muon, keys=("lr", "momentum", "nesterov", "weight_decay"),
        description="torch.optim.Muon (orthogonalised matrix updates, decoupled weight decay; matrices only)",
        validate=_validate_muon))
