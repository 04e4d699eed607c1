"""Every cross-reference that the code and the docs cite exists, and none is a tracker number.

The citations, as the repository writes them (every tracked ``.py`` and ``.md`` file):

- a document's section: ``docs/design.md §4`` (from the repository root, or relative to the
  citing file: ``method.md §1`` in docs/), with more sections after it (``§2-§4``, ``§1, §3``);
  a bare section sign in a Markdown file is a section of that file, or, in a list item that opens
  with a link to a document (docs/README.md's index), of that document. In Python a bare section
  sign is a paper's section (BEiT v2 §3.2) and is not checked;
- a title after a document or a section, in double quotes: ``README, "<title>"``,
  ``README's "<title>"``, ``BENCHMARKS.md ("<title>")``, ``docs/method.md §1, "<title>"``. The
  title is a heading of that document (of that section, after a section) or the bold words that
  open one of its paragraphs; a heading's trailing parenthesis (the benchmark's script) and a
  trailing full stop or colon are not part of the title;
- a relative Markdown link and a ``docs/<name>.md`` path: the file exists.

A section N is a heading ``## N. <title>``, as docs/ numbers them. Code blocks of a Markdown file
are not read for headings, titles or links.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The word issue (or issues) followed by a number, with or without "#": a tracker's number, which
# a reader of the repository cannot look up.
TRACKER = re.compile(r"\bissues? #?[0-9]+", re.IGNORECASE)

DOC = r"(?:docs/)?[\w-]+\.md"
SECTIONS = r"§\d+(?:(?:-| and |, )§\d+)*"
TITLE = r'"(?P<title>[^"\n]+)"'
# docs/design.md §4, method.md §1, §3, §2-§4, docs/method.md §1, "Training"
SECTION_CITE = re.compile(rf"(?:(?P<doc>{DOC}),? )?(?P<sections>{SECTIONS})(?:, {TITLE})?")
# README, "Heading" / README's "Heading" / README.md "Heading" / BENCHMARKS.md ("A" and "B")
TITLE_CITE = re.compile(
    rf"(?P<doc>{DOC}|\bREADME\b|\bBENCHMARKS\b)(?:'s|,)? \(?"
    r'(?P<titles>"[^"\n]+"(?:(?:,| and) "[^"\n]+")*)'
)
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w-]+\.md")
LINK = re.compile(r"\]\((?!https?:|#|mailto:)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")
INDEX_ITEM = re.compile(rf"^\s*- \[(?P<doc>{DOC})\]\((?P=doc)\)")


@dataclass
class Outline:
    """A Markdown file's headings and paragraph-opening bold words, overall and per section."""

    titles: set[str] = field(default_factory=set)
    sections: dict[int, set[str]] = field(default_factory=dict)  # N -> titles inside ``## N.``


def normalise(title: str) -> str:
    """A title as it is cited: without a trailing parenthesis, full stop or colon."""
    title = re.sub(r"\s*\([^()]*\)\s*$", "", title.strip())
    return title.rstrip(".:").strip()


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


@functools.cache
def outline(path: Path) -> Outline:
    doc, section = Outline(), None
    for _, line in prose_lines(path.read_text()):
        heading = re.match(r"^(#+)\s+(.*)$", line)
        bold = re.match(r"^\s*(?:- )?\*\*([^*]+)\*\*", line)
        if heading:
            number = re.match(r"(\d+)\.\s+(.*)$", heading.group(2))
            if len(heading.group(1)) == 2:
                section = int(number.group(1)) if number else None
                if section is not None:
                    doc.sections[section] = set()
            title = number.group(2) if number else heading.group(2)
        elif bold:
            title = bold.group(1)
        else:
            continue
        doc.titles.add(normalise(title))
        if section is not None:
            doc.sections[section].add(normalise(title))
    return doc


def resolve(cited: str, citing: Path) -> Path | None:
    """The file a citation names: relative to the citing file, else to the repository root."""
    cited = {"README": "README.md", "BENCHMARKS": "BENCHMARKS.md"}.get(cited, cited)
    for base in (citing.parent, ROOT):
        if (base / cited).is_file():
            return (base / cited).resolve()
    return None


def section_numbers(sections: str) -> list[int]:
    """``§2-§4`` -> [2, 3, 4]; ``§1, §3`` -> [1, 3]."""
    numbers = []
    for part in re.split(r", | and ", sections):
        bounds = [int(n) for n in re.findall(r"§(\d+)", part)]
        numbers += list(range(bounds[0], bounds[-1] + 1))
    return numbers


def problems_in(path: Path, text: str) -> list[str]:
    """Every citation in ``text`` (the file ``path``) that names something that is not there."""
    markdown = path.suffix == ".md"
    lines = prose_lines(text) if markdown else list(enumerate(text.splitlines(), 1))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    problems, index_doc = [], None
    for number, line in lines:
        where = f"{rel}:{number}"
        if markdown:
            item = INDEX_ITEM.match(line)
            if item:
                index_doc = item.group("doc")
            elif not line.startswith(" "):
                index_doc = None
        for m in SECTION_CITE.finditer(line):
            cited = m.group("doc") or (index_doc if markdown else None)
            if cited is None and not markdown:
                continue  # a paper's section
            target = resolve(cited, path) if cited else path
            if target is None:
                problems.append(f"{where}: cites {m.group(0)!r}: no file {cited}")
                continue
            sections = outline(target).sections
            for n in section_numbers(m.group("sections")):
                if n not in sections:
                    problems.append(
                        f"{where}: cites {m.group(0)!r}: {target.name} has no section {n} "
                        f"(its sections: {sorted(sections)})"
                    )
            last = section_numbers(m.group("sections"))[-1]
            title = m.group("title")
            if title and last in sections and normalise(title) not in sections[last]:
                problems.append(
                    f"{where}: cites {m.group(0)!r}: {target.name} §{last} has no heading or bold "
                    f"paragraph opening {title!r}"
                )
        for m in TITLE_CITE.finditer(line):
            target = resolve(m.group("doc"), path)
            if target is None:
                problems.append(f"{where}: cites {m.group(0)!r}: no file {m.group('doc')}")
                continue
            for title in re.findall(r'"([^"]+)"', m.group("titles")):
                if normalise(title) not in outline(target).titles:
                    problems.append(
                        f"{where}: cites {m.group(0)!r}: {target.name} has no heading or bold "
                        f"paragraph opening {title!r}"
                    )
        for m in DOCS_PATH.finditer(line):
            if resolve(m.group(0), path) is None:
                problems.append(f"{where}: names {m.group(0)}, which does not exist")
        if markdown:
            for m in LINK.finditer(line):
                if not (path.parent / m.group("target")).exists():
                    problems.append(f"{where}: links to {m.group('target')}, which does not exist")
    return problems


def tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *patterns],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are not known")
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def test_problems_in_finds_each_kind_of_broken_reference(tmp_path):
    """The checker itself, on a tiny docs folder: what exists passes, each broken kind is named."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## 1. One\n\n**Lead.** text\n\n## 2. Two\n\n```\n## 3. not a heading\n```\n"
    )
    (tmp_path / "BENCHMARKS.md").write_text("# B\n\n## Stage 2: on Dask (`bench.py`)\n\n## Plan\n")
    (tmp_path / "README.md").write_text("# R\n\n## Use\n\n**Resume, and what it refuses.** text\n")
    sign = "§"
    good = (
        f'docs/a.md {sign}1-{sign}2; docs/a.md {sign}1, "Lead"; README\'s "Resume, and what it '
        'refuses"; BENCHMARKS.md ("Stage 2: on Dask" and "Plan")'
    )
    bad = (
        f'docs/a.md {sign}3; docs/a.md {sign}2, "Lead"; BENCHMARKS.md, "Plan", "Stage 2"; '
        f"docs/b.md {sign}1; BEiT v2 {sign}3.2"
    )
    code = tmp_path / "x.py"
    assert problems_in(code, good) == []
    found = problems_in(code, bad)
    expected = [
        "a.md has no section 3",
        "a.md §2 has no heading or bold paragraph opening 'Lead'",
        "no file docs/b.md",
        "BENCHMARKS.md has no heading or bold paragraph opening 'Stage 2'",
        "names docs/b.md, which does not exist",
    ]
    assert len(found) == len(expected), found
    for fragment, problem in zip(expected, found, strict=True):
        assert fragment in problem


def test_every_cited_section_heading_and_file_exists():
    this = Path(__file__).resolve()
    problems = []
    for path in tracked("*.py", "*.md"):
        if path.resolve() != this:
            problems += problems_in(path, path.read_text(errors="replace"))
    assert not problems, "broken cross-references:\n" + "\n".join(problems)


def test_no_tracker_numbers():
    """A reference to "issue N" means nothing to a reader of the repository: say what it is."""
    hits = []
    for path in tracked("*.py", "*.md"):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if TRACKER.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "tracker numbers (say what the thing is instead):\n" + "\n".join(hits)
