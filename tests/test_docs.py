"""The documentation stays in step with the code."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def test_cli_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pipelines" / "cli_reference.py"), "--check"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_readme_has_exactly_the_two_setup_commands_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    setup = readme.split("## Set up")[1].split("\n## ")[0]
    commands = [line for line in setup.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert "bash pipelines/quickstart.sh" in commands[0]
    assert "pytest" in commands[1]
    assert readme.split("<!-- test-command -->")[1].splitlines()[2] == commands[1]


DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A repository path anywhere in the text, code blocks included: `pipelines/x.py`, docs/x.md, ...
REPO_PATH = re.compile(r"(?<![\w/.:-])((?:kdcache|pipelines|tests|docs)/[\w./-]*\w)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE_NAME = re.compile(r"^[\w./-]*\w\.(?:py|sh|md)$")
DOTTED_NAME = re.compile(r"^kdcache(?:\.\w+)+")
# architecture.md's "- **store/**: `writer.py` ..." bullets name files of that subpackage.
PACKAGE_BULLET = re.compile(r"^- \*\*(\w+)/\*\*")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (``## A `b`: c`` -> ``a-b-c``)."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def repository_file_names() -> set[str]:
    return {
        path.name
        for folder in ("kdcache", "pipelines", "tests", "docs")
        for path in (REPO_ROOT / folder).rglob("*")
        if path.is_file()
    }


def missing_names(doc: Path) -> list[str]:
    """The links, repository paths, file names and ``kdcache.x.y`` names of ``doc`` not found."""
    text = doc.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = doc.parent / file if file else doc
        if not path.exists():
            missing.append(f"link {target}")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            missing.append(f"link {target} (no such heading)")
    missing += [f"path {p}" for p in REPO_PATH.findall(text) if not (REPO_ROOT / p).exists()]
    names = repository_file_names()
    package = None
    for line in text.splitlines():
        if bullet := PACKAGE_BULLET.match(line):
            package = REPO_ROOT / "kdcache" / bullet.group(1)
        elif not line.startswith("  "):
            package = None
        for span in CODE_SPAN.findall(line):
            if FILE_NAME.match(span) and not REPO_PATH.fullmatch(span):
                if "/" in span:
                    found = (REPO_ROOT / span).exists() or (REPO_ROOT / "kdcache" / span).exists()
                elif package is not None:
                    found = (package / span).exists()
                else:
                    found = span in names
                if not found:
                    missing.append(f"file {span}")
            elif (dotted := DOTTED_NAME.match(span)) and not python_name_exists(dotted.group(0)):
                missing.append(f"name {dotted.group(0)}")
    return missing


def python_name_exists(dotted: str) -> bool:
    """Whether ``kdcache.a.b.c`` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj = importlib.import_module(module_name)
            for attribute in parts[cut:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_docs_name_only_files_and_names_that_exist(doc):
    assert missing_names(doc) == []


def test_the_docs_check_catches_a_missing_file(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(
        "# Page\n\nSee [there](other.md), [here](#nowhere), `pipelines/gone.py`,\n"
        "`gone_module.py`, `kdcache.no_such_module` and `kdcache.open_store_gone`;\n"
        "[up](#page) is fine.\n"
        "- **store/**: `sequence.py` exists, `gone.py` does not.\n"
    )
    assert missing_names(doc) == [
        "link other.md",
        "link #nowhere (no such heading)",
        "path pipelines/gone.py",
        "file gone_module.py",
        "name kdcache.no_such_module",
        "name kdcache.open_store_gone",
        "file gone.py",
    ]
