"""The tracker's segment reductions (symmetry/incidence.py) against the dense reference `Symmetry.masks()`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.symmetry.incidence import GroupIncidence, block_sums, reduce_onto

SHAPES = {"w": (5, 4, 3, 3), "b": (5,), "v": (3, 5), "m": (4, 4)}


def _compile(syms, shapes):
    return GroupIncidence(syms, shapes, error=TrackerError)


def _dense(syms, params, x, y, signed=True):
    out = torch.zeros(len(syms), dtype=torch.float64)
    for g, s in enumerate(syms):
        for k, d in s.masks(params).items():
            d = d.to(torch.float64)
            if not signed:
                d = d.abs()
            out[g] += (d * x[k].double() * y[k].double()).sum()
    return out


def _fixed_groups():
    return [
        # scale group: whole of b + slice 2 of w along dim 0
        Symmetry("scale", "s_w2", (Member("w", 0, (2,)), Member("b", 0, (2,)))),
        # rescale overlapping the scale group on w[2] (A2 = w[:, 2] in dim 1) and a flatten block of v
        Symmetry("rescale", "r", (Member("v", 1, (0, 1, 2, 3), "in"), Member("w", 1, (2,), "out"))),
        # whole-tensor members
        Symmetry("translation", "t_all", (Member("v"),)),
        Symmetry("scale", "s_whole", (Member("m"), Member("b"))),
        # members in dims 0 and 1 of the same parameter, one group (union: row 1 and column 3 of m)
        Symmetry("scale", "s_cross", (Member("m", 0, (1,)), Member("m", 1, (3,)))),
        # dims 0 and 1 of the same param in different groups, negative dim, repeated index
        Symmetry("rescale", "r2", (Member("m", 0, (0, 0, 2), "in"), Member("w", -4, (4,), "out"))),
        Symmetry("rescale", "r3", (Member("m", 1, (0,), "in"), Member("m", 1, (1, 2), "out"))),
    ]


def test_fixed_groups_match_masks():
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    other = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    syms = _fixed_groups()
    table = _compile(syms, {k: torch.Size(s) for k, s in SHAPES.items()})
    for signed in (True, False):
        got = table.reduce_many(lambda n: [(params[n], other[n]), (params[n], params[n])], 2, signed=signed)
        torch.testing.assert_close(got[0], _dense(syms, params, params, other, signed), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], _dense(syms, params, params, params, signed), rtol=1e-12, atol=1e-12)


def test_linear_sum_and_none_products():
    params = {k: torch.randn(s, dtype=torch.float64) for k, s in SHAPES.items()}
    syms = _fixed_groups()
    table = _compile(syms, {k: torch.Size(s) for k, s in SHAPES.items()})
    ones = {k: torch.ones(s) for k, s in SHAPES.items()}
    got = table.reduce_many(lambda n: [params[n], None], 2)
    torch.testing.assert_close(got[0], _dense(syms, params, params, ones), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], torch.zeros(len(syms), dtype=torch.float64))


def test_reduce_onto_keys():
    t = torch.randn(3, 4, 5)
    torch.testing.assert_close(reduce_onto(t, ()), t.double().sum().reshape(1))
    torch.testing.assert_close(reduce_onto(t, (1,)), t.double().sum((0, 2)))
    torch.testing.assert_close(reduce_onto(t, (0, 2)), t.double().sum(1).reshape(-1))
    torch.testing.assert_close(reduce_onto(t, (0, 1, 2)), t.double().reshape(-1))


@pytest.mark.parametrize("keys", [[()], [(0,)], [(1,)], [(0,), (1,)], [(0, 2), (1,), ()], [(0, 1, 2, 3)]])
def test_block_sums_equal_reduce_onto_and_are_float32_accurate(keys):
    """One product, every key: equal to the float64 reference to a few float32 ulp of sum |terms| per cell."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 48, 3, 3, generator=gen), torch.randn(64, 48, 3, 3, generator=gen)
    exact = x.double() * y.double()
    for key, got in zip(keys, block_sums(x, y, keys), strict=True):
        assert got.dtype == torch.float64
        want = reduce_onto(exact, key)
        scale = reduce_onto(exact.abs(), key)
        assert ((got - want).abs() <= 4e-7 * scale + 1e-30).all(), key
    for key, got in zip(keys, block_sums(x.double(), None, keys), strict=True):   # a field, float64: exact
        torch.testing.assert_close(got, reduce_onto(x.double(), key), rtol=1e-13, atol=1e-13)


@st.composite
def _groups(draw):
    syms = []
    for g in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["translation", "scale", "rescale"]))
        members = []
        roles = ["in", "out"] if kind == "rescale" else [None]
        used: dict[str, set] = {}
        for role in roles:
            for _ in range(draw(st.integers(1, 3))):
                name = draw(st.sampled_from(sorted(SHAPES)))
                shape = SHAPES[name]
                dim = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
                if kind == "rescale":  # keep A1 / A2 disjoint: one dim per parameter, disjoint indices
                    dim = 0
                    free = sorted(set(range(shape[0])) - used.setdefault(name, set()))
                    if not free:
                        continue
                    idx = tuple(draw(st.lists(st.sampled_from(free), min_size=1, max_size=3)))
                    used[name] |= set(idx)
                    members.append(Member(name, dim, idx, role))
                    continue
                if dim is None:
                    members.append(Member(name))
                else:
                    idx = tuple(draw(st.lists(st.integers(0, shape[dim] - 1), min_size=1, max_size=4)))
                    members.append(Member(name, dim, idx))
        if kind == "rescale" and not any(m.role == "in" for m in members):
            continue
        if kind == "rescale" and any(m.role == "in" for m in members) and any(
                a.param == b.param and a.role != b.role for a in members for b in members):
            pass
        syms.append(Symmetry(kind, f"g{g}", tuple(members)))
    return syms


@settings(max_examples=60, deadline=None)
@given(_groups(), st.integers(0, 2**16))
def test_random_groups_match_masks(syms, seed):
    if not syms:
        return
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    other = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    table = _compile(syms, {k: torch.Size(s) for k, s in SHAPES.items()})
    got = table.reduce_many(lambda n: [(params[n], other[n])], 1)[0]
    torch.testing.assert_close(got, _dense(syms, params, params, other), rtol=1e-10, atol=1e-10)


def test_bad_members_raise_tracker_errors():
    shapes = {k: torch.Size(s) for k, s in SHAPES.items()}
    with pytest.raises(TrackerError, match="out of range"):
        _compile([Symmetry("scale", "x", (Member("b", 0, (7,)),))], shapes)
    with pytest.raises(TrackerError, match="does not have"):
        _compile([Symmetry("scale", "x", (Member("nope"),))], shapes)
    with pytest.raises(TrackerError, match="overlap"):
        _compile([Symmetry("rescale", "x", (Member("b", 0, (1,), "in"), Member("b", 0, (1,), "out")))],
                         shapes)
    with pytest.raises(TrackerError, match="overlap"):
        _compile([Symmetry("rescale", "x", (Member("m", 0, (1,), "in"), Member("m", 1, (1,), "out")))],
                         shapes)
