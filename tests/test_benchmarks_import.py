"""Every benchmark and script still imports: they run on demand, never in the suite, so a refactor that moves a name
they use (as the tracker split moved `is_spaced`) would otherwise go unnoticed until someone runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py")])


@pytest.mark.parametrize("path", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"_nm_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while the class is built
    monkeypatch.syspath_prepend(str(path.parent))
    spec.loader.exec_module(module)  # module level only: each runs its work under `if __name__ == "__main__"`
    assert module.__doc__, f"{path.name} has no docstring saying what it measures and how to run it"
