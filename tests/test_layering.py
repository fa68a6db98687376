"""The import-linter contracts of pyproject.toml: they hold on the package, they would catch what they forbid, and
`make lint` (hence `make test`) runs them.

Each violation below is injected into a copy of the package and `lint-imports` must report exactly the contracts it
breaks: a contract that passes on the real code but would also pass on a broken one proves nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(importlib.util.find_spec("neural_mechanics").origin).parent  # the package under test, not imported
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = {c["id"]: c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
             ["contracts"]}


def lint(src: Path) -> tuple[int, str]:
    """Run lint-imports with the repository's contracts on the package found under `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "400", "NO_COLOR": "1"}
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=src,
                          env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def broken(output: str) -> set[str]:
    """Ids of the contracts the output reports BROKEN (every contract must be reported, kept or broken)."""
    status = {}
    for cid, name in CONTRACTS.items():
        m = re.search(re.escape(name) + r"\s+(KEPT|BROKEN)", output)
        assert m, f"contract {cid!r} not reported:\n{output}"
        status[cid] = m.group(1)
    return {cid for cid, s in status.items() if s == "BROKEN"}


def test_contracts_hold_on_the_package():
    assert LINT_IMPORTS.is_file(), "import-linter is in the dev extra; `make test` installs it"
    code, out = lint(PACKAGE.parent)
    assert code == 0, out
    assert broken(out) == set()
    assert set(CONTRACTS) == {"layers", "plots-read-runs", "symmetry-bottom", "acyclic-subpackages"}


# (module to edit, code appended to it, contracts that must break)
VIOLATIONS = {
    "symmetry imports constraints (upward, a cycle, and the bottom of symmetry reaching up through constraints)": (
        "symmetry/kinds.py", "import neural_mechanics.constraints\n",
        {"layers", "acyclic-subpackages", "symmetry-bottom"}),
    "theory imports symmetry inside a function": (
        "theory/hyper.py", "def _late():\n    from neural_mechanics.symmetry import kinds\n    return kinds\n",
        {"layers"}),
    "integrations import the training loop": (
        "integrations/tensorboard.py", "import neural_mechanics.experiments.config\n", {"layers"}),
    "plots import the optimizer hooks": (
        "plots/figures.py", "import neural_mechanics.tracking.tracker\n", {"plots-read-runs"}),
    "the working copy imports the detector": (
        "symmetry/utils.py", "import neural_mechanics.symmetry.detect\n", {"symmetry-bottom"}),
    "the loss specification imports graph capture": (
        "symmetry/loss.py", "import neural_mechanics.symmetry.capture\n", {"symmetry-bottom"}),
    "the LossSpec module imports the certifier": (
        "symmetry/loss_spec.py", "import neural_mechanics.symmetry.certify\n", {"symmetry-bottom"}),
    "a new top-level module in a cycle with errors": (
        "errors.py", "import neural_mechanics.newmodule\n", {"acyclic-subpackages"}),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_contracts_catch_violations(case, tmp_path):
    module, code, expected = VIOLATIONS[case]
    copy = tmp_path / "src" / "neural_mechanics"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "newmodule.py").write_text("import neural_mechanics.errors\n")  # imports errors; errors imports it back
    target = copy / module
    target.write_text(target.read_text() + "\n" + code)
    rc, out = lint(tmp_path / "src")
    assert rc != 0, out
    assert broken(out) == expected, out


def test_make_lint_runs_lint_imports_and_make_test_runs_lint():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "lint-imports" in recipe.group(1)
    test_deps = re.search(r"^test:(.*)$", makefile, re.M)
    assert test_deps and "lint" in test_deps.group(1).split()
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.replace("_", "-").startswith("import-linter") for d in dev)
