"""The README and the manual in docs/: every local link resolves, and every `docs/REFERENCE.md §N` cited exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def unfenced(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside code blocks and inline code spans (where brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to hyphens)."""
    seen: dict[str, int] = {}
    out = set()
    for line in unfenced(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


def test_anchors_follow_github_slugs(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("# The student's start: solved\n## A `code` b\n## A code b\n```\n# not a heading\n```\n")
    assert anchors(page) == {"the-students-start-solved", "a-code-b", "a-code-b-1"}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_local_links_resolve(page):
    links = local_links(page)
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link to {link}: no such file"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name}: link to {link}: no such heading in {target.name}"


def test_the_manual_is_linked_from_the_readme():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in local_links(REPO / "README.md")}
    for page in (REPO / "docs").glob("*.md"):
        assert page.resolve() in linked, f"README.md does not link docs/{page.name}"


def test_every_reference_citation_names_a_section():
    sections = set(re.findall(r"^## (\d+)\. ", (REPO / "docs" / "REFERENCE.md").read_text(), flags=re.M))
    cited = {}
    for path in [*REPO.glob("*.py"), *REPO.glob("*/**/*.py"), *PAGES]:
        if ".venv" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bSPEC §", text), f"{path}: cites SPEC, which is not in the repository"
        for n in re.findall(r"REFERENCE\.md §(\d+)", text):
            cited.setdefault(n, path)
    assert cited and set(cited) <= sections, {n: str(p) for n, p in cited.items() if n not in sections}
