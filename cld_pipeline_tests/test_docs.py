"""The documents are a house a newcomer can walk: a short README as the front door, one document per
reader under docs/, and no link that leads nowhere.

Every relative Markdown link in README.md, docs/*.md and data/README.md must name a file in the
repository and, when it gives a `#anchor`, a heading of that file (GitHub's slugs). Links to the web
(http, https, mailto) are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
READER_DOCS = ("architecture.md", "operations.md", "privacy.md", "analysts.md", "data-quality.md",
               "synthetic-data.md", "performance.md")
README_MAX_LINES = 150

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)   # http:, https:, mailto:, ...


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]


def outside_fences(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        yield number, line


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    return [(number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)) for number, line in outside_fences(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation removed except
    hyphens and spaces (letters, digits and underscores stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)                           # inline HTML renders as nothing
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a file offers: its headings' slugs (repeats numbered as GitHub does) and any
    explicit `<a name=...>` or `<a id=...>`."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in outside_fences(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        out.extend((number, target) for target in INLINE_LINK.findall(line))
        definition = REFERENCE_DEF.match(line)
        if definition:
            out.append((number, definition.group(1)))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: target (why)` for every relative link of `path` that leads nowhere."""
    problems = []
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        where = f"{path.relative_to(root) if path.is_relative_to(root) else path}:{number}: {target}"
        if not destination.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not destination.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination):
            problems.append(f"{where} (no heading #{anchor})")
    return problems


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    assert document.exists()
    assert broken_links(document) == []


def test_each_reader_has_a_document_linked_from_the_readme():
    targets = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if not EXTERNAL.match(t)}
    for name in READER_DOCS:
        doc = ROOT / "docs" / name
        assert doc.exists(), f"docs/{name} is missing"
        assert doc.resolve() in targets, f"README.md does not link docs/{name}"
    assert (ROOT / "docs" / "cld-fields.md").resolve() in targets


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_slugs_follow_githubs_rules():
    assert slug("Migration notes (interfaces of `../shared/contract.md`)") == \
        "migration-notes-interfaces-of-sharedcontractmd"
    assert slug("4. Backfill") == "4-backfill"
    assert slug("Ad hoc cohorts (`analyst/cohort_linkage`)") == "ad-hoc-cohorts-analystcohort_linkage"
    assert slug("Where to go next") == "where-to-go-next"
    assert slug("See [the runbook](docs/operations.md) — now") == "see-the-runbook--now"


def test_the_checker_catches_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#other-page) [repeat](other.md#same-1) [here](#page)\n"
        "[web](https://example.org/missing.md) `[in code](missing-in-code.md)`\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading) [bad local](#nowhere)\n"
        "[escape](../../outside.md)\n"
        "[ref]: also-missing.md\n",
        encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md (no such file)",
        "other.md#no-such-heading (no heading #no-such-heading)",
        "#nowhere (no heading #nowhere)",
        "../../outside.md (outside the repository)",
        "also-missing.md (no such file)",
    ]
    assert problems[0].startswith("page.md:8: ")
