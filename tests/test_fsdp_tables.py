"""Segment tables against one rank's shards (tracking/shard_tables.py), in one process: the ranks are simulated by
slicing whole tensors the way FSDP2 shards them (torch.chunk's rule), and the ranks' partial sums must add up to the
global table's sums (and to the dense reference `Symmetry.masks()`).

Covers uneven shards (rows not divisible by the rank count), ranks holding no rows, shards along dim 0 (FSDP2's
default) and dim 1, members along the sharded and the other dims, whole-tensor members, block members (grouped
convolutions) and replicas that must not count.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence
from neural_mechanics.tracking.products import Fields, Product, reduce_products
from neural_mechanics.tracking.shard_tables import LocalIncidence, ShardBox
from test_tracking_reductions import SHAPES, _dense, _fixed_groups, _groups

BLOCK = Symmetry("scale", "s_block", (Member("w", 0, (1, 2), sub_dim=1, sub_index=(0, 3)),))
"""A grouped-convolution block: rows 1, 2 of w restricted to input channels 0 and 3."""


def chunk_box(shape: tuple[int, ...], ranks: int, rank: int, dim: int = 0) -> ShardBox:
    """Rank `rank`'s block of a tensor sharded on `dim` over `ranks` ranks by torch.chunk's rule (FSDP2 / DTensor
    Shard(dim)): ceil(n / ranks) per rank, the last ranks get fewer or none. Tensors with fewer dims: dim 0."""
    dim = dim if dim < len(shape) else 0
    per = math.ceil(shape[dim] / ranks)
    start = min(rank * per, shape[dim])
    size = max(0, min(per, shape[dim] - start))
    offset = tuple(start if d == dim else 0 for d in range(len(shape)))
    return ShardBox(offset, tuple(size if d == dim else n for d, n in enumerate(shape)))


def _block(t: torch.Tensor, box: ShardBox) -> torch.Tensor:
    return t[tuple(slice(o, o + n) for o, n in zip(box.offset, box.shape, strict=True))]


def _sharded_sum(syms, x, y, ranks, dim, signed=True, replicas=1):
    """sum over simulated ranks of each rank's partial sums of x * y (through reduce_products, as the tracker)."""
    table = GroupIncidence(syms, {k: torch.Size(s) for k, s in SHAPES.items()}, error=TrackerError)
    total = torch.zeros(len(syms), dtype=torch.float64)
    product = Product("p", "x", "y", signed=signed)
    for replica in range(replicas):
        for r in range(ranks):
            boxes = {k: chunk_box(s, ranks, r, dim) for k, s in SHAPES.items()}
            if replica:  # a replica holds the same blocks but must not count them
                boxes = {k: ShardBox(b.offset, b.shape, counts=False) for k, b in boxes.items()}
            lt = LocalIncidence(table, {k: boxes[k] for k in table.params})
            fields = Fields({}, {"x": lambda n, b=boxes: _block(x[n], b[n]),
                                 "y": lambda n, b=boxes: _block(y[n], b[n])})
            total += reduce_products(lt, [product], fields)["p"]
    return total


def _data(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    y = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    return x, y


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 6], ids=lambda n: f"ranks{n}")
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
def test_ranks_partial_sums_add_up_to_the_global_sums(ranks, dim):
    """SHAPES have 5, 5, 3 and 4 rows: 6 ranks leave ranks without rows of every parameter, 4 ranks split 5 rows
    2 + 2 + 1 + 0; the fixed groups have members along both dims, whole tensors, repeated indices and A1 / A2."""
    syms = [*_fixed_groups(), BLOCK]
    x, y = _data(0)
    table = GroupIncidence(syms, {k: torch.Size(s) for k, s in SHAPES.items()}, error=TrackerError)
    for signed in (True, False):
        want = table.reduce_many(lambda n: [(x[n], y[n])], 1, signed=signed)[0]
        got = _sharded_sum(syms, x, y, ranks, dim, signed)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_sharded_sum(syms, x, y, ranks, dim), _dense(syms, x, x, y), rtol=1e-12, atol=1e-12)


def test_a_rank_holds_only_the_cells_of_its_rows():
    """Along the sharded dim a rank holds the cells of its own rows; along another dim every cell, partially."""
    syms = [Symmetry("scale", "row4", (Member("b", 0, (4,)),)),
            Symmetry("translation", "col0", (Member("v", 1, (0,)),))]
    table = GroupIncidence(syms, {k: torch.Size(s) for k, s in SHAPES.items()}, error=TrackerError)
    first = LocalIncidence(table, {k: chunk_box(SHAPES[k], 2, 0) for k in table.params})   # b rows 0-2, v rows 0-1
    second = LocalIncidence(table, {k: chunk_box(SHAPES[k], 2, 1) for k in table.params})  # b rows 3-4, v row 2
    assert first.total_cells == 3 + 5 and second.total_cells == 2 + 5
    assert sorted(first.group.tolist()) == [1] and sorted(second.group.tolist()) == [0, 1]


def test_replicas_do_not_count():
    """HSDP-like layout (2 replicas x 3 shards): only the first replica's blocks are counted."""
    syms = _fixed_groups()
    x, y = _data(1)
    want = _sharded_sum(syms, x, y, 3, 0)
    torch.testing.assert_close(_sharded_sum(syms, x, y, 3, 0, replicas=2), want, rtol=0, atol=0)


def test_float32_fields_stay_float32_within_a_cell():
    """float32 shards: each rank's cells are float32 sums, combined in float64 (as on one process)."""
    syms = _fixed_groups()
    x, y = _data(2, torch.float32)
    table = GroupIncidence(syms, {k: torch.Size(s) for k, s in SHAPES.items()}, error=TrackerError)
    want = table.reduce_many(lambda n: [(x[n], y[n])], 1)[0]
    got = _sharded_sum(syms, x, y, 3, 0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(_groups(), st.integers(1, 7), st.integers(0, 1), st.integers(0, 2**16))
def test_random_groups_random_shardings(syms, ranks, dim, seed):
    if not syms:
        return
    x, y = _data(seed)
    torch.testing.assert_close(_sharded_sum(syms, x, y, ranks, dim), _dense(syms, x, x, y), rtol=1e-10, atol=1e-10)
