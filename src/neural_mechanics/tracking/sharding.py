"""How a model is sharded (FSDP1, FSDP2 or not at all), and the two refusals that follow from it.

* `refuse_fsdp1(model)`: the Tracker follows FSDP2 (`fully_shard`: every parameter a DTensor sharded on dim 0,
  `tracking/shard_tables.py`) but not FSDP1 (`FullyShardedDataParallel`), whose FlatParameters concatenate many
  tensors, flattened, into one 1-D shard per rank whose layout depends on the wrapping policy: a group's slices
  are not rows of anything a rank can name. The Tracker calls it.
* `check_not_sharded(model)`: symmetry detection (and anything else that runs the model on one rank, such as the
  start-of-run constraint check) needs the whole, unsharded model. Detect before `fully_shard` (FSDP2 keeps the
  parameter names) and hand the symmetries to the Tracker of the sharded model; `nmech train` does exactly that
  with `--set distributed.strategy=fsdp2`.

No import of torch.distributed.fsdp happens here: an object of its classes can only exist once the package that
defines it has been imported, so the classes are looked up among the loaded modules (importing FSDP costs ~1-2 s
of CPU, which every `nmech` command would otherwise pay).
"""

from __future__ import annotations

import sys

from torch import nn

from neural_mechanics.errors import TrackerError

__all__ = ["check_not_sharded", "is_dtensor", "refuse_fsdp1", "sharding"]

_FSDP_MODULE = "torch.distributed.fsdp"
_DTENSOR_MODULE = "torch.distributed.tensor"


def _loaded_class(module: str, name: str) -> type | None:
    """Class `name` of `module` if that module has been imported, else None."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (torch.distributed.tensor: a sharded or replicated tensor)."""
    cls = _loaded_class(_DTENSOR_MODULE, "DTensor")
    return cls is not None and isinstance(t, cls)


def sharding(model: nn.Module) -> tuple[str, str] | None:
    """("fsdp1" | "fsdp2", where) when `model` is sharded, else None.

    fsdp1: some module is a `FullyShardedDataParallel`; fsdp2: some module is an `FSDPModule` (`fully_shard`) or
    some parameter is a DTensor. `where` names the first such module or parameter.
    """
    fsdp1 = _loaded_class(_FSDP_MODULE, "FullyShardedDataParallel")
    fsdp2 = _loaded_class(_FSDP_MODULE, "FSDPModule")
    dtensor = _loaded_class(_DTENSOR_MODULE, "DTensor")
    for name, m in model.named_modules():
        where = f"module {name or '(root)'!r} is {type(m).__name__}"
        if fsdp1 is not None and isinstance(m, fsdp1):
            return "fsdp1", where
        if fsdp2 is not None and isinstance(m, fsdp2):
            return "fsdp2", where
    if dtensor is not None:
        for name, p in model.named_parameters():
            if isinstance(p, dtensor):
                return "fsdp2", f"parameter {name!r} is a DTensor"
    return None


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise TrackerError when `model` is wrapped with FSDP1 (`FullyShardedDataParallel`); FSDP2 passes."""
    found = sharding(model)
    if found is not None and found[0] == "fsdp1":
        raise TrackerError(f"the model is sharded with FSDP1 ({found[1]}): its FlatParameters concatenate many "
                           "flattened tensors into one shard per rank, so a symmetry group's slices are not rows "
                           "the tracker can locate",
                           "shard with FSDP2 instead (torch.distributed.fsdp.fully_shard; `nmech train --set "
                           "distributed.strategy=fsdp2`), or train with DistributedDataParallel; docs/distributed.md "
                           "says what runs")


def check_not_sharded(model: nn.Module, *, fix: str | None = None) -> None:
    """Raise TrackerError when `model` is sharded at all (FSDP1, FSDP2): it must be whole here (detection)."""
    found = sharding(model)
    if found is None:
        return
    refuse_fsdp1(model)
    raise TrackerError(f"the model is already sharded with FSDP2 ({found[1]}); symmetry detection runs on the whole "
                       "model",
                       fix or "detect the symmetries before fully_shard (parameter names are kept) and pass them to "
                       "the Tracker of the sharded model; `nmech train --set distributed.strategy=fsdp2` shards after "
                       "detection itself (return the plain model from the model spec); docs/distributed.md")
