"""Whether a model is sharded (FSDP), which the tracker cannot follow yet: `check_not_sharded`.

The training loop and the Lightning callback call it before attaching a Tracker; it belongs with the tracker
because it states a limit of the tracker, not of any particular loop.
"""

from __future__ import annotations

from torch import nn

from neural_mechanics.errors import TrackerError

try:  # torch built without distributed support has neither (and then nothing can be sharded)
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    _SHARDED_MODULES: tuple[type, ...] = (FullyShardedDataParallel, FSDPModule)
    _SHARDED_PARAMS: tuple[type, ...] = (DTensor,)
except ImportError:  # pragma: no cover - depends on the torch build
    _SHARDED_MODULES = ()
    _SHARDED_PARAMS = ()


def check_not_sharded(model: nn.Module) -> None:
    """Raise TrackerError when `model` is sharded with FSDP (FSDP1 wrapper, FSDP2 `fully_shard`, DTensor params).

    Why refused rather than supported: under FSDP a rank holds only a flat shard of each parameter
    outside forward/backward, so at the optimizer step hooks a symmetry group's slices are spread over
    ranks; the tracker would need a per-group all-reduce of every cell sum, plus shard-aware segment
    tables. docs/distributed.md writes that design down; until it exists, a silent wrong answer is worse
    than no answer.
    """
    sharded = ""
    for name, m in model.named_modules():
        if isinstance(m, _SHARDED_MODULES):
            sharded = f"module {name or '(root)'!r} is {type(m).__name__}"
            break
    if not sharded:
        for name, p in model.named_parameters():
            if isinstance(p, _SHARDED_PARAMS):
                sharded = f"parameter {name!r} is a DTensor (sharded)"
                break
    if sharded:
        raise TrackerError(f"the model is sharded with FSDP ({sharded}); the tracker needs whole parameters at "
                           "the optimizer step",
                           "train with DistributedDataParallel instead (`torchrun ... nmech train`), or set "
                           "tracker.enabled=false; docs/distributed.md explains why FSDP is not tracked yet")
