"""Every torchvision classification model: detection equals the hand derivation, and every group certifies.

For each model of `torchvision.models.list_models(module=torchvision.models)` (built as in
test_torchvision_support.py: num_classes=10, train mode, batch 2 at the smallest input the model accepts):
- counts: tests/zoo_expectations.py derives the number of translation / scale / rescale groups from the model's
  architecture (its module tree), by the rules of docs/theory.md section 1, without the detector. The detector's
  counts must equal that derivation: this is an independent expectation, so a detector bug fails here. The row of
  docs/torchvision_counts.md must show the same numbers and say "derived" (a stale table fails too).
  A model whose family has no derivation (none today; a family torchvision adds later) is a REGRESSION SNAPSHOT:
  its counts are compared with the table, which the detector itself wrote (scripts/torchvision_counts.py), so that
  check catches a change, not an error; its row says "snapshot".
- `certify` in float64 applies every group at once (all groups, and per kind) plus a seeded sample of
  single groups, and every relative change of loss and outputs is <= 1e-6 (soundness, whatever the counts).
Models too large for the machine are skipped with the reason (test_torchvision_support.LARGE).
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch

from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member, Symmetry
from neural_mechanics.symmetry.loss import first_tensor
from test_detect_support import certify_groups
from test_torchvision_support import DOC, EXPECTED, all_names, available_gb, read_expected, read_table, specs
from zoo_expectations import derive, provenance

torch.set_num_threads(1)
TABLE = read_table() if DOC.exists() else {}
SOURCE = read_expected() if DOC.exists() else {}


@functools.cache
def incidence_supports_blocks() -> bool:
    """True when symmetry/incidence.py expands a block member (`Member.sub_dim`) exactly like `Symmetry.masks`."""
    from neural_mechanics.symmetry.incidence import GroupIncidence

    params = {"w": torch.zeros(4, 2)}
    sym = Symmetry("scale", "s", (Member("w", 0, (1, 2), None, 1, (1,)),))
    try:
        expanded = GroupIncidence([sym], params).expand(torch.ones(1, dtype=torch.float64))["w"]
    except Exception:
        return False
    return torch.equal(expanded.cpu(), sym.masks(params)["w"].double())


def test_the_table_covers_the_whole_list():
    """Every model of the list has a row or a documented reason to be skipped."""
    skipped = {s.name for s in specs() if s.skip}
    assert set(all_names()) == set(TABLE) | skipped
    assert not set(TABLE) & skipped
    text = DOC.read_text()
    for name in skipped:
        assert f"`{name}`" in text.split("Skipped", 1)[1]
    assert all(SOURCE[name] in EXPECTED for name in TABLE), "every row says whether its counts are derived"


HEAVY = {"vit_l_16", "vit_l_32"}
"""~300M parameters, ~9 GB each at certification's peak: one xdist worker runs them one after the other (make test
uses --dist loadgroup), so two never meet on a 24 GB machine."""


@pytest.mark.slow
@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.xdist_group("heavy")) if s.name in HEAVY else s
                                  for s in specs()], ids=lambda s: s.name)
def test_detection_matches_the_derivation_and_certifies(spec):
    if spec.skip:
        pytest.skip(spec.skip)
    need, have = spec.memory_gb(), available_gb()
    if need > 0.8 * have:
        pytest.skip(f"{spec.name} needs ~{need:.1f} GB, this machine has {have:.1f} GB available")
    model = spec.build()
    x = spec.inputs()
    with torch.no_grad():  # non-vacuous certification: the logits depend on the class and the sample
        logits = first_tensor(model(x))
    assert logits.std(1).min() > 0 and (logits[0] - logits[1]).abs().max() > 0
    s = find_symmetries(model, x, loss=spec.loss)
    c = s.counts()
    found = (c["translation"], c["scale"], c["rescale"])
    expected = derive(model, aux_in_loss=bool(spec.kwargs.get("aux_logits")))  # Spec.loss includes the aux heads then
    assert SOURCE[spec.name] == provenance(model), (
        f"{spec.name}: the table says {SOURCE[spec.name]!r}; rerun scripts/torchvision_counts.py --models {spec.name}")
    if expected is not None:
        assert found == expected, (
            f"{spec.name}: the detector finds {found}, the hand derivation (tests/zoo_expectations.py) expects "
            f"{expected}: find out which is wrong (certify the disputed groups)\n{s.details()}")
        assert TABLE[spec.name] == expected, (
            f"{spec.name}: {DOC.name} shows {TABLE[spec.name]}; rerun scripts/torchvision_counts.py "
            f"--models {spec.name}")
    else:  # regression snapshot: the table was written by the detector, so this catches change, not error
        assert found == TABLE[spec.name], (
            f"{spec.name}: counts changed from the snapshot in {DOC.name}; if intended, rerun "
            f"scripts/torchvision_counts.py --models {spec.name}\n{s.details()}")
    groups = list(s)
    if not incidence_supports_blocks():
        # the compiled engine behind certify's compositions does not know block members (grouped
        # convolutions) yet: certify those with the dense reference action, one at a time
        blocks = [g for g in groups if any(m.sub_dim is not None for m in g.members)]
        if blocks:
            certify_groups(model, blocks, x, sample=3)
            groups = [g for g in groups if not any(m.sub_dim is not None for m in g.members)]
    report = certify(model, groups, x, loss=spec.loss, sample=1, tol=1e-6)
    assert report.ok, report.summary()
    assert report.all_at_once and all(r.n_groups > 0 for r in report.all_at_once)
    del model, s, report
    gc.collect()
