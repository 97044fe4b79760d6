"""The documentation's links keep working when sections move between files.

The README, ``docs/*.md``, ``bench/README.md`` and ``deploy/README.md`` link to each other by
relative path and ``#anchor``; code comments, manifests and messages name docs pages too.  A
section moved or renamed without fixing its links leaves a reader on a 404 or at the top of the
wrong page; these tests read the files as GitHub renders them (its anchor rules: lowercase,
punctuation dropped, spaces to '-') and fail naming the file, the line and the link.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import ROOT

DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "deploy" / "README.md",
               *(ROOT / "docs").glob("*.md")])
# Code, manifests and comments that send the reader to a docs page by name.
POINTERS = sorted(p for p in [ROOT / "Dockerfile", *(ROOT / "sidecar").rglob("*.py"),
                              *(ROOT / "deploy").rglob("*.y*ml"), *(ROOT / "deploy").rglob("*.json"),
                              *(ROOT / "config").glob("*.yaml"), *(ROOT / "bench").glob("*.py"),
                              *(ROOT / "tests").glob("*.py")] if p.name != "test_docs.py")
_POINTER = re.compile(r"(docs/[\w-]+\.md)(?:, \"([^\"]+)\")?")

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or ")".
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lowercased, punctuation dropped, spaces to '-'.

    Markup is reduced to its text first (``[text](url)`` to ``text``, backticks and emphasis
    dropped); letters, digits, '_' and '-' stay, in any script.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, _CODE_SPAN.sub("", line)))
    return lines


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated slugs get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in _headings(path):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _headings(path: Path) -> list[tuple[int, str]]:
    """(line number, heading text) of every ATX heading outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line)):
            out.append((number, match.group(2)))
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file, or whose anchor in that file, does not exist."""
    problems = []
    for number, line in _prose_lines(path):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            where = f"{_shown(path)}:{number}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no such file {_shown(dest)}")
            elif anchor and dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor and unquote(anchor) not in anchors(dest):
                problems.append(f"{where}: no heading with the anchor #{anchor} in {_shown(dest)}")
    return problems


@pytest.mark.parametrize("heading, slug", [
    ("The drain timeline", "the-drain-timeline"),
    ("Add it to your own workloads: `sidecar inject`", "add-it-to-your-own-workloads-sidecar-inject"),
    ("The termination timeline (base, with the manifests' numbers)",
     "the-termination-timeline-base-with-the-manifests-numbers"),
    ("Sizing delay, timeout and grace period", "sizing-delay-timeout-and-grace-period"),
    ("sidecar — lossless shutdowns for any HTTP app", "sidecar--lossless-shutdowns-for-any-http-app"),
    ("Run (one command, from the repository root)", "run-one-command-from-the-repository-root"),
    ("throughput.py flags", "throughputpy-flags"),
])
def test_anchors_are_spelled_as_github_spells_them(heading: str, slug: str) -> None:
    """The checker's anchors are GitHub's, so a link that passes here works on GitHub."""
    assert github_slug(heading) == slug


def test_the_checker_catches_a_moved_section(tmp_path: Path) -> None:
    """A link to a file that moved, or to a heading that was renamed, is reported with its line."""
    page = tmp_path / "page.md"
    page.write_text("# Probe\n\n## Kept\n\n[ok](#kept) [gone](#renamed) [file](nowhere.md)\n"
                    "`[in code](#ignored)`\n```\n[in a fence](#ignored)\n```\n", encoding="utf-8")
    problems = broken_links(page)
    assert [p.split(" ", 1)[0] for p in problems] == [f"{page}:5:"] * 2
    assert "#renamed" in problems[0] and "nowhere.md" in problems[1]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    """Every relative link in the README, docs/ and bench/README.md reaches a file and heading."""
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """A reader who starts at the README can reach every page of docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _LINK.findall(readme)}
    missing = [p.name for p in (ROOT / "docs").glob("*.md")
               if p.name != "README.md" and p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


def test_every_docs_page_named_in_code_and_manifests_exists() -> None:
    """A comment or message saying 'see docs/x.md, "Heading"' names a page and heading that exist."""
    problems = []
    for path in POINTERS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for page, heading in _POINTER.findall(line):
                where = f"{_shown(path)}:{number}: {page}"
                if not (ROOT / page).exists():
                    problems.append(f"{where}: no such page")
                elif heading and not any(text.startswith(heading)
                                         for _, text in _headings(ROOT / page)):
                    problems.append(f"{where}: no heading starting {heading!r}")
    assert not problems, "pages or headings that do not exist:\n" + "\n".join(problems)
