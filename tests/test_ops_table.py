"""docs/ops.md is the table scripts/ops_table.py writes from the op-rule table (not edited by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

from neural_mechanics.symmetry.ops import rules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import ops_table


def test_committed_table_equals_generated():
    assert ops_table.DOC.read_text() == ops_table.render(), "docs/ops.md is out of date: run scripts/ops_table.py"


def test_every_builtin_op_is_listed_once():
    text = ops_table.render()
    for rule in rules(builtin_only=True):
        assert text.count(f"`{rule.op}`") == 1, rule.op
