"""Every reference to a document of the repository resolves; nothing cites one outside it.

The docs, the README and the code (Python, templates, scripts, the Makefile and the other
build files) are scanned for:

- Markdown links to relative paths, `[text](docs/foo.md)` or `(scheduling.md#a-section)`: the
  file must exist, and an anchor into a Markdown file must be the GitHub slug of one of its
  headings;
- plain mentions of a Markdown document, `docs/foo.md`: the file must exist, and what the
  mention points into must be there too: `docs/foo.md, "Title"` (a heading that starts with
  the title), `docs/foo.md, section 3` or `§ 3` (a heading numbered 3), `docs/foo.md,
  invariants 1 and 5` (items of its numbered list of invariants);
- in the docs, plain mentions of the repository's other files, `jobs/engine.py`: the file must
  exist (a template's name may also be read from templates/);
- citations of what the repository does not hold: a design document, and issue or pull-request
  numbers, ours or another project's. The repository stands alone: a reason is written out
  where it is used.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve()

SKIPPED_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".hypothesis", ".ruff_cache"}
# Vendored libraries, and what runs write (gitignored): not ours to check.
SKIPPED_PATHS = {"static/vendor", "bench/results", "tests/browser/artifacts", "reliability/results"}
SCANNED_SUFFIXES = {".md", ".py", ".html", ".js", ".sh", ".txt", ".toml"}
SCANNED_NAMES = {"Makefile", "Procfile", ".env.example", "run"}  # `run`: .ci/run
# Documents that a run writes, named in the code that writes them (bench/report.py: the bench's
# report.md in each bench/results/<run>/).
GENERATED_DOCUMENTS = {"report.md"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
MARKDOWN_LINK = re.compile(
    r"\[(?:[^\[\]\n]|\[[^\]\n]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)\n]*)?\)"
)
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
# The end of a Markdown document's path as the code and the docs mention it (the path is read
# back from there: a scan for the ending is many times faster than one for the whole path), and
# what may follow the path: a quoted title, a section number or invariants, possibly on the next
# line of a comment.
DOCUMENT_SUFFIX = re.compile(r"\.md(?![\w-])")
AFTER_MENTION = re.compile(
    r"""(?:,|\s\(|\s)[ \t]*(?:\n[ \t]*(?:\#[ \t]*)?)?
    (?:
        "(?P<title>[^"\n]+(?:\n[ \t]*(?:\#[ \t]*)?[^"\n]+)?)"
      | (?:sections?|§)[ \t]*(?P<section>\d+)
      | invariants?[ \t]+(?P<invariants>\d+(?:(?:,[ \t]*|[ \t]+and[ \t]+)\d+)*)
    )""",
    re.VERBOSE,
)
# Another file of the repository as the docs mention it: a path under one of its top-level
# directories (which `code_mention_problems` checks), with the extension of a file we keep.
CODE_MENTION = re.compile(
    r"(?<![\w./<>-])((?:[\w.-]+/)+[\w.-]+\.(?:py|sql|sh|txt|toml|html|js|css|json|ya?ml))(?![\w/-])"
)
# What the repository does not hold, each with a word that any citation of it contains (texts
# without the word are not searched).
CITATIONS = [
    ("DESIGN", re.compile(r"DESIGN\.md|DESIGN\s*§"), "a design document outside the repository"),
    ("ssue", re.compile(r"\b[Ii]ssues?\s+#?\d+"), "an issue number"),
    ("ull request", re.compile(r"\b[Pp]ull requests?\s+#?\d+"), "a pull-request number"),
    ("PR", re.compile(r"\bPRs?\s+#?\d+"), "a pull-request number"),
    ("github.com", re.compile(r"github\.com/[^\s)]*/(?:issues|pull)/\d+"), "an issue's address"),
]
# `#12`, an issue number when it stands alone or follows a project's name (`celery#6760`,
# `owner/repo#12`); not in `color: #333`, `value="#333"`, `2#2` (a cron field) or `#1-processes`.
HASH_NUMBER = re.compile(r"#\d+(?![\w-])")
PROJECT_BEFORE = re.compile(r"(?:^|[^\w./#-])(?P<name>[a-z][\w.-]*(?:/[\w.-]+)?)$")


def scanned_files() -> list[Path]:
    found = []
    for directory, subdirs, names in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT)
        subdirs[:] = [
            d
            for d in subdirs
            if d not in SKIPPED_DIRS and (relative / d).as_posix() not in SKIPPED_PATHS
        ]
        for name in names:
            path = Path(directory, name)
            if (path.suffix in SCANNED_SUFFIXES or name in SCANNED_NAMES) and path != THIS_FILE:
                found.append(path)
    return sorted(found)


@functools.cache
def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def outside_fences(text: str) -> str:
    """The text with the lines of fenced code blocks blanked (offsets and line numbers kept)."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def plain(heading: str) -> str:
    """A heading as it reads: links become their text, emphasis and code marks go."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[*`]", "", heading).strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", plain(heading).lower()).replace(" ", "-")


@functools.cache
def headings(path: Path) -> list[tuple[int, str]]:
    found = []
    for line in outside_fences(text_of(path)).split("\n"):
        match = HEADING.match(line)
        if match:
            found.append((len(match.group(1)), plain(match.group(2))))
    return found


@functools.cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


@functools.cache
def invariants(path: Path) -> set[int]:
    """The numbers of the items listed under the document's heading about invariants."""
    numbers: set[int] = set()
    level = None
    for line in outside_fences(text_of(path)).split("\n"):
        match = HEADING.match(line)
        if match:
            if level is not None and len(match.group(1)) <= level:
                level = None
            if "invariant" in match.group(2).lower():
                level = len(match.group(1))
        elif level is not None and (item := re.match(r"^(\d+)\.\s", line)):
            numbers.add(int(item.group(1)))
    return numbers


def joined(words: str) -> str:
    """Words quoted across lines of a comment, on one line."""
    return " ".join(re.sub(r"\n[ \t]*#?", " ", words).split())


def titled(document: Path, title: str) -> bool:
    """Whether a heading of the document starts with the title (its number may be left out)."""
    title = re.escape(joined(title).lower()) + r"(?!\w)"
    return any(
        re.match(title, heading.lower()) or re.match(r"\d+\.\s+" + title, heading.lower())
        for _, heading in headings(document)
    )


def resolve(target: str, source: Path) -> Path | None:
    """The repository file a relative reference names, read from the root or beside its source
    (a bare document name may also be one of docs/)."""
    candidates = [ROOT / target.lstrip("/"), source.parent / target]
    if "/" not in target:
        candidates.append(ROOT / "docs" / target)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return None


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{line_of(text, offset)}"


def link_problems(path: Path) -> list[str]:
    text = outside_fences(text_of(path))
    targets = [(m.start(), m.group(1)) for m in MARKDOWN_LINK.finditer(text)]
    targets += [(m.start(), m.group(1)) for m in REFERENCE_DEFINITION.finditer(text)]
    problems = []
    for offset, target in targets:
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        if file_part:
            document = (path.parent / file_part).resolve()
            if not document.exists():
                problems.append(f"{where(path, text, offset)}: {file_part} does not exist")
                continue
        else:
            document = path
        if anchor and document.suffix == ".md" and anchor not in anchors(document):
            problems.append(
                f"{where(path, text, offset)}: {target}: no heading of "
                f"{document.relative_to(ROOT)} has the anchor #{anchor}"
            )
    return problems


def document_mentions(text: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of each Markdown document's path in the text; not those in addresses."""
    found = []
    for suffix in DOCUMENT_SUFFIX.finditer(text):
        start = suffix.start()
        while start and (text[start - 1].isalnum() or text[start - 1] in "_.-/"):
            start -= 1
        name = text[start : suffix.end()]
        if name != ".md" and not name.startswith("/"):
            found.append((start, suffix.end(), name))
    return found


def mention_problems(path: Path) -> list[str]:
    text = text_of(path)
    problems = []
    for start, end, name in document_mentions(text):
        if name in GENERATED_DOCUMENTS:
            continue
        at = where(path, text, start)
        document = resolve(name, path)
        if document is None:
            problems.append(f"{at}: {name} does not exist")
            continue
        after = AFTER_MENTION.match(text, end)
        if after is None:
            continue
        if after["title"]:
            if not titled(document, after["title"]):
                problems.append(f'{at}: {name} has no heading "{joined(after["title"])}"')
        elif after["section"]:
            number = after["section"]
            if not any(re.match(rf"{number}\.\s", heading) for _, heading in headings(document)):
                problems.append(f"{at}: {name} has no section {number}")
        elif after["invariants"]:
            cited = {int(n) for n in re.findall(r"\d+", after["invariants"])}
            missing = sorted(cited - invariants(document))
            if missing:
                problems.append(f"{at}: {name} lists no invariant {', '.join(map(str, missing))}")
    return problems


def code_mention_problems(path: Path) -> list[str]:
    text = text_of(path)
    top_level = {entry.name for entry in ROOT.iterdir() if entry.is_dir()}
    problems = []
    for mention in CODE_MENTION.finditer(text):
        name = mention.group(1)
        if name.split("/")[0] not in top_level or name.startswith(tuple(SKIPPED_PATHS)):
            continue
        if resolve(name, path) is None and not (ROOT / "templates" / name).exists():
            problems.append(f"{where(path, text, mention.start())}: {name} does not exist")
    return problems


def test_every_referenced_document_heading_and_section_exists():
    problems = []
    for path in scanned_files():
        if path.suffix == ".md":
            problems += link_problems(path) + code_mention_problems(path)
        problems += mention_problems(path)
    problems = list(dict.fromkeys(problems))
    assert not problems, "broken references to documents:\n" + "\n".join(problems)


def citations(text: str) -> list[tuple[int, str, str]]:
    """(offset, citation, what it cites) of each citation of something outside the repository."""
    found = []
    for word, pattern, what in CITATIONS:
        if word in text:
            found += [(match.start(), match.group(), what) for match in pattern.finditer(text)]
    cited = {offset for offset, _, _ in found}
    for match in HASH_NUMBER.finditer(text):
        before = text[max(0, match.start() - 80) : match.start()]
        project = PROJECT_BEFORE.search(before)
        alone = not before or (before[-1] in " \t\n(" and not re.search(r"[:=]\s*$", before))
        if project:
            name = project["name"]
            found.append((match.start() - len(name), name + match.group(), "an issue number"))
        elif alone and not any(match.start() - 20 < offset < match.start() for offset in cited):
            found.append((match.start(), match.group(), "an issue number"))
    return found


def test_nothing_cites_a_document_or_an_issue_outside_the_repository():
    problems = []
    for path in scanned_files():
        text = text_of(path)
        problems += [
            f"{where(path, text, offset)}: {citation!r}: {what}"
            for offset, citation, what in citations(text)
        ]
    assert not problems, "citations of what the repository does not hold:\n" + "\n".join(problems)


def test_the_slugs_are_githubs():
    assert slug("3. A submission, module by module") == "3-a-submission-module-by-module"
    assert slug("6. Lifecycles: runs and steps") == "6-lifecycles-runs-and-steps"
    assert slug("`run_submit` and [the API](api.md)") == "run_submit-and-the-api"
