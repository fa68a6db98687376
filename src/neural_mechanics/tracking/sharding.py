"""Whether a model is sharded (FSDP), which the tracker cannot follow yet: `check_not_sharded`.

The training loop and the Lightning callback call it before attaching a Tracker; it belongs with the tracker
because it states a limit of the tracker, not of any particular loop.
"""

from __future__ import annotations

import sys

from torch import nn

from neural_mechanics.errors import TrackerError

#: (module, class names): the FSDP wrappers (FSDP1, FSDP2's `fully_shard`) and the sharded parameter type.
_SHARDED_MODULES = ("torch.distributed.fsdp", ("FullyShardedDataParallel", "FSDPModule"))
_SHARDED_PARAMS = ("torch.distributed.tensor", ("DTensor",))


def _loaded_classes(module: str, names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes `names` of `module` if that module has been imported, else none.

    Sound without importing anything: an object of one of these classes can only exist once the package that
    defines it has been imported (importing torch.distributed.fsdp costs ~1 s of CPU, which every `nmech`
    command would otherwise pay).
    """
    mod = sys.modules.get(module)
    found = (getattr(mod, n, None) for n in names) if mod is not None else ()
    return tuple(c for c in found if isinstance(c, type))


def check_not_sharded(model: nn.Module) -> None:
    """Raise TrackerError when `model` is sharded with FSDP (FSDP1 wrapper, FSDP2 `fully_shard`, DTensor params).

    Why refused rather than supported: under FSDP a rank holds only a flat shard of each parameter
    outside forward/backward, so at the optimizer step hooks a symmetry group's slices are spread over
    ranks; the tracker would need a per-group all-reduce of every cell sum, plus shard-aware segment
    tables. docs/distributed.md writes that design down; until it exists, a silent wrong answer is worse
    than no answer.
    """
    sharded = ""
    wrappers, params = _loaded_classes(*_SHARDED_MODULES), _loaded_classes(*_SHARDED_PARAMS)
    for name, m in model.named_modules():
        if isinstance(m, wrappers):
            sharded = f"module {name or '(root)'!r} is {type(m).__name__}"
            break
    if not sharded:
        for name, p in model.named_parameters():
            if isinstance(p, params):
                sharded = f"parameter {name!r} is a DTensor (sharded)"
                break
    if sharded:
        raise TrackerError(f"the model is sharded with FSDP ({sharded}); the tracker needs whole parameters at "
                           "the optimizer step",
                           "train with DistributedDataParallel instead (`torchrun ... nmech train`), or set "
                           "tracker.enabled=false; docs/distributed.md explains why FSDP is not tracked yet")
