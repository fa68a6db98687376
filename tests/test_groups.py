"""The reference mathematics of one group (action, generator, charge) and the JSON contract."""

import copy
import json
import pickle
from dataclasses import fields

import pytest
import torch

from neural_mechanics import Member, Symmetry, SymmetrySet


def params():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "b.weight": torch.randn(2, 4, generator=g)}


def rescale(c=1):
    return Symmetry("rescale", f"r{c}", (Member("a.weight", 0, (c,), "in"), Member("a.bias", 0, (c,), "in"),
                                         Member("b.weight", 1, (c,), "out")))


def test_charge_matches_direct_formula():
    p = params()
    r = rescale(1)
    direct = p["a.weight"][1].pow(2).sum() + p["a.bias"][1] ** 2 - p["b.weight"][:, 1].pow(2).sum()
    assert torch.allclose(r.charge(p), direct.double())
    t = Symmetry("translation", "t", (Member("b.weight", 1, (2,)),))
    assert torch.allclose(t.charge(p), p["b.weight"][:, 2].sum().double())


def test_action_scales_charge_and_generator_is_derivative():
    p = {k: v.double() for k, v in params().items()}
    r = rescale(2)
    moved = {**p, **r.act(p, 2.0)}
    assert torch.allclose(moved["a.weight"][2], 2 * p["a.weight"][2])
    assert torch.allclose(moved["b.weight"][:, 2], p["b.weight"][:, 2] / 2)
    assert torch.equal(moved["a.weight"][0], p["a.weight"][0])
    # generator = d psi / d alpha at alpha = 1 (finite difference)
    eps = 1e-6
    plus, minus = r.act(p, 1 + eps), r.act(p, 1 - eps)
    xi = r.generator(p)
    for k in xi:
        assert torch.allclose((plus[k] - minus[k]) / (2 * eps), xi[k], atol=1e-8)


def test_scale_action_rejects_nonpositive_alpha():
    s = Symmetry("scale", "s", (Member("a.weight", 0, (0,)),))
    with pytest.raises(ValueError, match="alpha > 0"):
        s.act(params(), -1.0)


def test_json_round_trip_and_contract_shape():
    s = SymmetrySet([rescale(0), rescale(1), Symmetry("translation", "t", (Member("a.bias"),))])
    text = s.to_json()
    data = json.loads(text)
    assert isinstance(data, list) and data[0]["kind"] == "rescale"
    assert data[0]["members"][0] == {"param": "a.weight", "dim": 0, "index": [0], "role": "in"}
    assert data[2]["members"][0] == {"param": "a.bias", "dim": None, "index": None, "role": None}
    back = SymmetrySet.from_json(text)
    assert list(back) == list(s)
    assert back.counts() == {"translation": 1, "scale": 0, "rescale": 2}
    assert back["r1"].layer == "a"


def test_bad_groups_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="duplicate"):
        SymmetrySet([rescale(0), rescale(0)])
    with pytest.raises(ValueError, match="role"):
        Symmetry("rescale", "x", (Member("a.weight", 0, (0,)),))
    with pytest.raises(ValueError, match="unknown symmetry kind"):
        Symmetry("boost", "x", (Member("a.weight"),))
    overlap = Symmetry("rescale", "o", (Member("a.weight", 0, (0,), "in"), Member("a.weight", 1, (0,), "out")))
    with pytest.raises(ValueError, match="overlap"):
        overlap.check(params())
    with pytest.raises(ValueError, match="does not have"):
        Symmetry("scale", "m", (Member("zzz.weight"),)).check(params())


def test_trusted_constructors_build_the_same_objects():
    """`Member.trusted` / `Symmetry.trusted` skip the checks (detection builds ~100k members per model) but must
    build objects equal to the checked constructors', with every dataclass field set: a field added to either
    class and forgotten in `trusted` fails here."""
    cases = [("conv.weight", None, None, None, None, None), ("conv.weight", 0, (3,), "in", None, None),
             ("conv.weight", 0, (0, 1), "out", 1, (2, 5))]
    for args in cases:
        checked, fast = Member(*args), Member.trusted(*args)  # type: ignore[arg-type]
        assert fast == checked and hash(fast) == hash(checked)
        assert all(getattr(fast, f.name) == getattr(checked, f.name) for f in fields(Member))  # unset slot: raises
        assert pickle.loads(pickle.dumps(fast)) == fast and copy.deepcopy(fast) == fast
    members = (Member("a.weight", 0, (1,), "in"), Member("b.weight", 1, (1,), "out"))
    checked_g = Symmetry("rescale", "rescale:a[1]", members, "a", ("a.weight[1]", "b.weight[:,1]"))
    fast_g = Symmetry.trusted("rescale", "rescale:a[1]", members, "a", ("a.weight[1]", "b.weight[:,1]"))
    assert fast_g == checked_g and fast_g.to_dict() == checked_g.to_dict()
    assert all(getattr(fast_g, f.name) == getattr(checked_g, f.name) for f in fields(Symmetry))
    assert pickle.loads(pickle.dumps(fast_g)) == fast_g and copy.deepcopy(fast_g).chain == fast_g.chain
