"""The documentation stays self-contained and in step with the code.

- every citation of the theory page ("docs/theory.md section N") names a section that exists, and nothing
  cites a file outside the repository;
- every relative link in README.md and docs/*.md resolves;
- docs/contract.md documents exactly the package's public names and the run store's group columns, so a new
  export or column fails here until it is documented (and a documented one that disappears fails too).
"""

from __future__ import annotations

import re
from pathlib import Path

import neural_mechanics as nm
from neural_mechanics.tracking.store import GROUP_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = [p for d in ("src", "tests", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")]
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _theory_sections() -> set[str]:
    """Top-level ("## N.") and sub-section ("### N.M") numbers of docs/theory.md."""
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (DOCS / "theory.md").read_text(), flags=re.M))


def test_theory_citations_name_existing_sections():
    sections = _theory_sections()
    assert {str(n) for n in range(7)} <= sections, sorted(sections)
    cited = {}
    for path in SOURCES + PAGES:
        for n in re.findall(r"theory\.md,? sections? (\d+(?:\.\d+)?)", path.read_text()):
            cited.setdefault(n, path.relative_to(ROOT))
    assert cited, "the code cites docs/theory.md"
    missing = {n: str(p) for n, p in cited.items() if n not in sections}
    assert not missing, f"citations of sections docs/theory.md does not have: {missing}"


def test_nothing_cites_files_outside_the_repository():
    pattern = re.compile(r"THEORY\.md|DESIGN\.md|\.\./shared|shared/")
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES + PAGES
                 if p != Path(__file__).resolve() and pattern.search(p.read_text())]
    assert not offenders


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))  # indented code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_contract_lists_the_public_names():
    text = (DOCS / "contract.md").read_text()
    block = text.split("Top-level names (stable):", 1)[1].split("Import them", 1)[0]
    documented = set(re.findall(r"`(\w+)`", block))
    assert documented == set(nm.__all__), (
        f"exported but not in docs/contract.md: {sorted(set(nm.__all__) - documented)}; "
        f"documented but not exported: {sorted(documented - set(nm.__all__))}")


def test_contract_lists_the_frame_columns():
    text = (DOCS / "contract.md").read_text()
    table = text.split("Columns:", 1)[1].split("`Run.layers()`", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert len(documented) == len(set(documented))
    assert set(documented) == set(GROUP_COLUMNS), (
        f"stored but not documented: {sorted(set(GROUP_COLUMNS) - set(documented))}; "
        f"documented but not stored: {sorted(set(documented) - set(GROUP_COLUMNS))}")
