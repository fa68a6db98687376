"""The tracker's per-group sums over sharded parameters: partial sums per rank, one all_reduce(SUM) per batch.

`Reduction` is the one function every per-group sum of the tracker goes through (`Tracker._sums`, handed to the
strategies as `StepContext.reduce`), with two brackets a strategy uses to say when it needs the values:

    with ctx.batch():      sums requested inside are filled in when the block exits
    with ctx.defer():      sums requested inside are filled in by the next collective (a later `reduce` or batch
                           exit, at the latest when the step ends)

On one process (`LocalSums`) both brackets do nothing and every sum is final when returned. `CollectiveSums`
(parameters sharded with FSDP2) forms each rank's partial sums on its local shards (`tracking/shard_tables.py`)
and adds them over ranks with one `all_reduce(SUM)` of the concatenated float64 vectors of everything requested
since the last collective. Inside a bracket it returns placeholders, filled in place by that collective: they
read NaN until then, so a strategy that reads a value too early gets NaN, never a partial sum.

Every rank runs the same hooks on the same step and log decisions (`Tracker`), so every rank issues the same
collectives in the same order with the same sizes. The collective is asynchronous on CUDA (NCCL enqueues it on
the stream): nothing here synchronises with the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neural_mechanics.errors import TrackerError
from neural_mechanics.tracking.families import ChargeFamily
from neural_mechanics.tracking.products import Fields, Product, reduce_products
from neural_mechanics.tracking.shard_tables import LocalIncidence, shard_box
from neural_mechanics.tracking.sharding import is_dtensor

__all__ = ["CollectiveSums", "LocalSums", "Reduction", "make_reduction"]


class Reduction:
    """The tracker's reduction function plus its two brackets (see the module docstring)."""

    collective = False
    """True when sums are added over ranks (every rank must then run the same hooks with the same decisions)."""

    def __call__(self, family: ChargeFamily, products: Sequence[Product], fields: Fields) -> dict[str, Tensor]:
        raise NotImplementedError

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Sums requested inside are filled in at exit (one collective for all of them)."""
        yield

    @contextlib.contextmanager
    def defer(self) -> Iterator[None]:
        """Sums requested inside are filled in by the next collective (at the latest at `end_step`)."""
        yield

    def end_step(self) -> None:
        """Fill in whatever is still pending (the tracker calls it at the end of every step)."""


class LocalSums(Reduction):
    """One process, whole parameters: `reduce_products` on the family's table; the brackets do nothing."""

    def __call__(self, family: ChargeFamily, products: Sequence[Product], fields: Fields) -> dict[str, Tensor]:
        return reduce_products(family.table, products, fields)


class CollectiveSums(Reduction):
    """Partial sums against each rank's shards, added over the ranks of the parameters' device mesh."""

    collective = True

    def __init__(self, families: Sequence[ChargeFamily], params: Mapping[str, nn.Parameter]):
        boxes = {name: shard_box(name, p) for name, p in params.items()}
        self.tables = {id(f): LocalIncidence(f.table, boxes) for f in families}
        self.group = _process_group(params)
        self.collectives = 0
        """Number of all_reduce calls so far (tests and benchmarks read it)."""
        self._pending: list[tuple[Tensor, Tensor]] = []
        """(this rank's partial sum, the placeholder the global sum goes into), in request order."""
        self._batch = 0
        self._defer = 0

    def __call__(self, family: ChargeFamily, products: Sequence[Product], fields: Fields) -> dict[str, Tensor]:
        partial = reduce_products(self.tables[id(family)], products, fields)
        out: dict[str, Tensor] = {}
        for name, t in partial.items():
            out[name] = torch.full_like(t, float("nan"))
            self._pending.append((t, out[name]))
        if self._batch == 0 and self._defer == 0:
            self.flush()
        return out

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._batch += 1
        try:
            yield
        except BaseException:
            self._pending.clear()  # a failed step's sums must not join a later collective
            raise
        finally:
            self._batch -= 1
        if self._batch == 0:
            self.flush()

    @contextlib.contextmanager
    def defer(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1

    def end_step(self) -> None:
        self.flush()

    def flush(self) -> None:
        """One all_reduce(SUM) of every pending partial sum, written into the placeholders."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flat = torch.cat([p.reshape(-1) for p, _ in pending])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        for (_, target), value in zip(pending, flat.split([t.numel() for _, t in pending]), strict=True):
            target.copy_(value.view_as(target))


def _process_group(params: Mapping[str, nn.Parameter]) -> dist.ProcessGroup | None:
    """The group spanning the parameters' device mesh (all must share one); None = the default group."""
    meshes = {id(p.device_mesh): (name, p.device_mesh) for name, p in params.items()}  # type: ignore[attr-defined]
    first_name, mesh = next(iter(meshes.values()))
    for name, other in meshes.values():
        if other != mesh:
            raise TrackerError(f"parameters {first_name!r} and {name!r} are sharded over different device meshes",
                               "shard every tracked parameter over one mesh (one fully_shard mesh for the model)")
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None
    raise TrackerError(f"the parameters' device mesh {mesh} has several dimensions and covers only some ranks",
                       "use a 1-D mesh, or a mesh over all ranks (e.g. HSDP's (replicate, shard) over the world)")


def make_reduction(families: Sequence[ChargeFamily], params: Mapping[str, nn.Parameter]) -> Reduction:
    """`CollectiveSums` when the tracked parameters are DTensors (FSDP2), else `LocalSums`.

    TrackerError when only some are DTensors (FSDP2's ignored parameters, a root module left unsharded): their
    entries would be counted once per rank, or their ranks would disagree.
    """
    sharded = [n for n, p in params.items() if is_dtensor(p)]
    if not sharded:
        return LocalSums()
    plain = [n for n in params if n not in set(sharded)]
    if plain:
        raise TrackerError(f"parameter {plain[0]!r} is not sharded while {sharded[0]!r} is (a DTensor)",
                           "apply fully_shard to the root module too and track no ignored parameters, or detect "
                           "the symmetries without them")
    return CollectiveSums(families, params)
