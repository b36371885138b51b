"""The README and docs/: every relative link reaches a file that exists and, with a #fragment, one of its headings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    found, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            found.add(_anchor(line.lstrip("#")))
    return found


def test_anchors_follow_githubs_rule():
    assert _anchor(" The paper's ensemble table (its Table 4) on Fashion-MNIST") == \
        "the-papers-ensemble-table-its-table-4-on-fashion-mnist"
    assert _anchor(" The demo ensemble (`make demo`)") == "the-demo-ensemble-make-demo"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves(doc):
    bad = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif fragment and fragment not in _anchors(dest):
            bad.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_the_readme_links_to_every_results_section():
    """The README's summary table points into docs/RESULTS.md; a results section nobody links to was forgotten."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {t.partition("#")[2] for t in LINK.findall(readme) if t.startswith("docs/RESULTS.md#")}
    sections = {_anchor(line.lstrip("#")) for line in (ROOT / "docs" / "RESULTS.md").read_text().splitlines()
                if line.startswith("### ") or line.startswith("## ")}
    assert sections - linked <= {"real-runs-on-this-2-core-cpu"}, sorted(sections - linked)
