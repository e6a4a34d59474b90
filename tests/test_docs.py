"""The README and docs/ point at things that exist: relative links resolve to files, every `make`
target they name is in the Makefile, and every `moe` subcommand they show answers --help."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks, and inline code spans, where commands are shown."""
    lines = [line for block in CODE_BLOCK.findall(text) for line in block.splitlines()]
    prose = CODE_BLOCK.sub("", text)
    return lines + INLINE_CODE.findall(prose)


def named(pattern: str) -> dict[str, set[str]]:
    """word -> pages showing `<pattern> word` at the start of a command."""
    found: dict[str, set[str]] = {}
    command = re.compile(rf"^\s*(?:\$\s+)?{pattern}\s+([a-z][\w-]*)")
    for page in PAGES:
        for line in code_lines(page.read_text()):
            if match := command.match(line):
                found.setdefault(match.group(1), set()).add(page.name)
    return found


def test_pages_exist():
    assert (REPO / "README.md").exists() and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_an_existing_file(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_every_make_target_the_docs_name_is_in_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, re.MULTILINE))
    shown = named("make")
    assert {"run", "test"} <= shown.keys(), "the README names its two commands"
    missing = {target: sorted(pages) for target, pages in shown.items() if target not in targets}
    assert not missing, f"make targets the docs name but the Makefile lacks: {missing}"


def test_every_moe_subcommand_the_docs_show_answers_help():
    module, function = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["moe"].split(":")
    shown = named("moe")
    assert {"up", "generate", "down"} <= shown.keys()
    failing = {}
    for subcommand, pages in sorted(shown.items()):
        done = subprocess.run(
            [sys.executable, "-c",
             f"import sys; from {module} import {function} as main; sys.exit(main(sys.argv[1:]))",
             subcommand, "--help"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or f"moe {subcommand}" not in done.stdout:
            failing[subcommand] = (sorted(pages), done.stderr.strip()[-300:])
    assert not failing, f"`moe` subcommands the docs show that do not answer --help: {failing}"
