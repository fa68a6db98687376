"""Segment tables against one rank's shards of the parameters (FSDP2 DTensors): `ShardBox`, `LocalIncidence`.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) a rank holds, outside forward and backward, one block of every
parameter: a DTensor sharded on dim 0 (torch.chunk's rule: ceil(rows / N) rows per rank, so with rows not
divisible by N the last ranks get fewer rows, or none). Its gradient, its momentum buffer and any copy of it
(the update u of an adaptive optimizer) are sharded the same way. `ShardBox` says where this rank's block sits in
the global parameter (offset and size per dim, from the DTensor's placements), and whether this rank's copy counts
(on a mesh with replicated dims only coordinate 0 of those dims does, so every entry is counted once).

The tracker's per-group sums (`symmetry/incidence.py`) are linear in the parameter entries, and every entry lives
on exactly one counting rank, so for any product P = x * y of sharded fields

    sum over the cells of group i of D_i P  =  sum over ranks r of (the same sum over the entries rank r holds).

`LocalIncidence` is the global `GroupIncidence` restricted to this rank's block: a member slice `param[dim, index]`
along the sharded dim maps to the local rows index - offset (or is absent), slices along the other dims stay,
a whole-tensor member becomes the local block. Its cells are the global cells this rank holds entries of (a
cell along an unsharded dim is held partially by every rank), its triples those of the global table that touch
them, renumbered; `reduce_products(local_table, ...)` then gives this rank's partial per-group sums, and one
all_reduce(SUM) over ranks gives the global ones (`tracking/collective_sums.py`). Built once per run; nothing in
it synchronises with the host per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.incidence import Factor, GroupIncidence, Key, fill_cells, segment_sum
from neural_mechanics.tracking.sharding import is_dtensor

__all__ = ["LocalBlock", "LocalIncidence", "ShardBox", "local", "shard_box"]


def local(t: Tensor) -> Tensor:
    """This rank's block of `t` (a DTensor's local tensor; any other tensor as it is)."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardBox:
    """Where this rank's block of a parameter sits in the global tensor: entries [offset_d, offset_d + shape_d)."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    """The local block's shape (0 along the sharded dim on a rank that holds no rows)."""
    counts: bool = True
    """False on a replica: a rank with a non-zero coordinate on a mesh dim the parameter is replicated over."""

    @classmethod
    def whole(cls, shape: Sequence[int]) -> ShardBox:
        """The box of an unsharded tensor: all of it."""
        return cls(tuple(0 for _ in shape), tuple(int(n) for n in shape))


def shard_box(name: str, p: Tensor) -> ShardBox:
    """The box of parameter `name` on this rank: whole for a plain tensor, from the placements for a DTensor.

    Placements Shard(d) (even or uneven, any dim, FSDP2's default is dim 0) and Replicate on any mesh dims are
    supported; anything else (Partial, strided shards of FSDP2 + tensor parallel) raises TrackerError.
    """
    if not is_dtensor(p):
        return ShardBox.whole(p.shape)
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    odd = [str(pl) for pl in placements if type(pl).__name__ not in ("Shard", "Replicate")]
    if odd:
        raise TrackerError(f"parameter {name!r} is a DTensor with placements {placements}: the tracker follows "
                           "Shard(dim) and Replicate placements only",
                           "shard with FSDP2's default placement (fully_shard without shard_placement_fn or "
                           "tensor parallelism), or set tracker.enabled=false")
    coord = p.device_mesh.get_coordinate()  # type: ignore[attr-defined]
    if coord is None:  # this rank is not in the parameter's mesh: it holds nothing
        return ShardBox(tuple(0 for _ in p.shape), tuple(0 for _ in p.shape), counts=False)
    replica = any(pl.is_replicate() and c != 0 for pl, c in zip(placements, coord, strict=True))
    (chunk,) = p.__create_chunk_list__()  # type: ignore[attr-defined]  # DTensor's own (offsets, sizes) of its block
    box = ShardBox(tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes), counts=not replica)
    held = tuple(local(p).shape)
    if held != box.shape:
        raise TrackerError(f"parameter {name!r}: the local shard has shape {held} but its placements say "
                           f"{box.shape}", "report this with the model and the sharding used")
    return box


@dataclass(frozen=True)
class LocalBlock:
    """One (parameter, key) table of cells over this rank's block: where it sits in the local cell vector."""

    param: str
    key: Key
    n_cells: int
    offset: int


def _global_cells(key: Key, global_shape: Sequence[int], box: ShardBox) -> Tensor:
    """long [prod of box.shape over key]: the global cell ids (row-major over `key`) of the local cells, in order."""
    ids = torch.zeros((), dtype=torch.long)
    for d in key:
        ids = ids.unsqueeze(-1) * global_shape[d] + torch.arange(box.offset[d], box.offset[d] + box.shape[d])
    return ids.reshape(-1)


class LocalIncidence:
    """`table` restricted to the entries this rank holds (see the module docstring); `reduce_products` takes it
    wherever it takes a GroupIncidence, with sharded (DTensor) or local fields alike.

    `boxes` maps each parameter the table touches to its `ShardBox` on this rank.
    """

    def __init__(self, table: GroupIncidence, boxes: Mapping[str, ShardBox]):
        self.n = table.n
        self.device = table.device
        self.boxes = dict(boxes)
        self.by_param: dict[str, list[LocalBlock]] = {}
        to_global: list[Tensor] = []
        offset = 0
        for blk in table.blocks:
            box = self.boxes[blk.param]
            if not box.counts:
                continue
            ids = _global_cells(blk.key, blk.shape, box)
            self.by_param.setdefault(blk.param, []).append(LocalBlock(blk.param, blk.key, ids.numel(), offset))
            to_global.append(blk.offset + ids)
            offset += ids.numel()
        self.total_cells = offset
        cell_ids = torch.cat(to_global) if to_global else torch.zeros(0, dtype=torch.long)
        pos = torch.full((table.total_cells,), -1, dtype=torch.long)
        pos[cell_ids] = torch.arange(offset)
        local_cell = pos[table.cell.cpu()]
        keep = local_cell >= 0
        self.cell = local_cell[keep].to(self.device)
        """long [nnz_local]: index into the local cell vector."""
        self.group = table.group.cpu()[keep].to(self.device)
        """long [nnz_local]: group id of the triple."""
        self.sign = table.sign.cpu()[keep].to(self.device)
        """float64 [nnz_local]: D on that cell."""

    @property
    def params(self) -> list[str]:
        """The parameters this rank holds entries of (in the global table's order)."""
        return list(self.by_param)

    def cells(self, factors: Callable[[str], Sequence[Factor]], n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """[n, total_cells]: `GroupIncidence.cells` over this rank's blocks (DTensor factors are read locally)."""
        return fill_cells(self.by_param, self.total_cells, self.device, factors, n, dtype, read=local)

    def segment_sum(self, cells: Tensor, signed: bool = True) -> Tensor:
        """[q, n]: this rank's partial per-group sums of `cells` (the global table's rule on the local triples)."""
        return segment_sum(cells, self.cell, self.group, self.sign, self.n, signed)
