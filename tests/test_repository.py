"""The repository stands alone: nothing points outside it, and every link in its documentation resolves.

People who clone the project have only the repository, so a comment citing a team note kept elsewhere, or a README
link to a file that was moved, leaves them with a dead end. Files are the ones git would ship: tracked, plus new
files not yet committed (ignored files, such as the virtual environment, are not part of the repository).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built from parts so that this file does not match itself.
OUTSIDE_REFERENCES = ("../" + "shared/", "shared" + "/brief")
# Team notes that live outside the repository; cited by bare file name they are dead ends too.
OUTSIDE_NOTES = ("physics", "method", "offline", "hub-format", "style")
VENDORED = re.compile(r"personalization/assets/.*/(vocab\.json|merges\.txt)$")  # the CLIP tokenizer's data
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A page under docs/ or the README, with an optional #anchor, cited from code comments and docstrings.
CITATION = re.compile(r"(?<![\w./-])((?:docs/[\w.-]+|README)\.md)(#[\w-]+)?")


@cache
def repository_files() -> tuple[str, ...]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the repository's file list comes from git")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode("utf-8")
    return tuple(sorted(name for name in set(listed.split("\0")) if name and (REPO / name).is_file()))


@cache
def text_of(name: str) -> str | None:
    """The file's text; None for binary files (images, weights) and the vendored tokenizer data."""
    if VENDORED.search(name):
        return None
    data = (REPO / name).read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files() -> list[str]:
    return [name for name in repository_files() if text_of(name) is not None]


def markdown_files() -> list[str]:
    return [name for name in repository_files() if name.endswith(".md")]


def exists_in_repository(path: PurePosixPath) -> bool:
    """A file git ships, or a folder holding one."""
    name = str(path)
    return name in repository_files() or any(other.startswith(name.rstrip("/") + "/") for other in repository_files())


def without_code_blocks(markdown: str) -> list[str]:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


@cache
def anchors(name: str) -> frozenset[str]:
    """The #anchors GitHub gives the headings of markdown file ``name``."""
    seen: dict[str, int] = {}
    result = set()
    for line in without_code_blocks(text_of(name) or ""):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(result)


def test_the_anchor_rule_matches_github():
    assert re.sub(r"[^\w\- ]", "", "SD-1.5 on a CPU".lower()).replace(" ", "-") == "sd-15-on-a-cpu"
    assert "loading-a-pushed-model-with-plain-diffusers" in anchors("README.md")
    assert "results-on-the-mini-world-2-core-cpu" in anchors("README.md")


def test_no_file_points_outside_the_repository():
    offenders = [f"{name}:{number}: {line.strip()[:100]}"
                 for name in text_files()
                 for number, line in enumerate(text_of(name).splitlines(), 1)
                 if any(reference in line for reference in OUTSIDE_REFERENCES)]
    assert offenders == [], "files cite notes outside the repository:\n" + "\n".join(offenders)


def test_no_file_cites_a_team_note_by_name():
    shipped = {PurePosixPath(name).name for name in repository_files()}
    missing = [note for note in OUTSIDE_NOTES if f"{note}.md" not in shipped]
    pattern = re.compile(rf"(?<![\w-])({'|'.join(map(re.escape, missing))})\.md\b")
    offenders = [f"{name}:{number}: {line.strip()[:100]}"
                 for name in text_files()
                 for number, line in enumerate(text_of(name).splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == [], "files cite notes the repository does not hold:\n" + "\n".join(offenders)


def test_every_relative_link_in_the_documentation_resolves():
    broken = []
    for name in markdown_files():
        folder = PurePosixPath(name).parent
        for line in without_code_blocks(text_of(name) or ""):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                    continue  # https:, mailto: and other absolute links
                path_part, _, anchor = target.partition("#")
                linked = name if not path_part else normalized(folder / path_part)
                if linked is None or not exists_in_repository(PurePosixPath(linked)):
                    broken.append(f"{name}: ({target}) names no file of the repository")
                elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
                    broken.append(f"{name}: ({target}) names no heading of {linked}")
    assert broken == [], "\n".join(broken)


def test_documentation_cited_from_code_exists():
    broken = []
    for name in text_files():
        if not name.endswith((".py", ".sh")):
            continue
        for number, line in enumerate(text_of(name).splitlines(), 1):
            for cited, anchor in CITATION.findall(line):
                if cited not in repository_files():
                    broken.append(f"{name}:{number}: {cited} is not in the repository")
                elif anchor and anchor[1:] not in anchors(cited):
                    broken.append(f"{name}:{number}: {cited} has no heading {anchor}")
    assert broken == [], "\n".join(broken)


def normalized(path: PurePosixPath) -> str | None:
    """``path`` with ``..`` folded, relative to the repository root; None when it climbs out of the repository."""
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts) if parts else "."
