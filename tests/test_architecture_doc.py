"""docs/architecture.md stays true to the tree: its "Where to add" lists name files that exist,
and it describes every subpackage of kdcache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "kdcache"
DOC = REPO_ROOT / "docs" / "architecture.md"
FILE_SPAN = re.compile(r"`([\w./-]*\w\.(?:py|sh|md))`")
#: Paths under these folders are from the repository root; any other path is under kdcache/.
ROOT_FOLDERS = ("tests/", "docs/", "pipelines/")
#: What issue 18 asked the section to answer, each as the start of one bullet.
ANSWERS = (
    "An encoding",
    "A loss with a hyper-parameter",
    "A dataset kind",
    "A recipe operation",
    "A command-line option",
    "A task",
)


def where_to_add() -> str:
    text = DOC.read_text()
    start = text.index("\n## Where to add\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def named_files(section: str) -> list[tuple[str, Path]]:
    """(name as written, path) of every file the section names. A bare file name is in the
    folder of the last path named in the same bullet (``augment/ops.py``, ``photometric.py``),
    or in kdcache/ when the bullet has named none."""
    found = []
    folder = PACKAGE
    for line in section.splitlines():
        if line.lstrip().startswith("- "):
            folder = PACKAGE
        for name in FILE_SPAN.findall(line):
            if "/" not in name:
                found.append((name, folder / name))
                continue
            path = (REPO_ROOT if name.startswith(ROOT_FOLDERS) else PACKAGE) / name
            if path.is_relative_to(PACKAGE):
                folder = path.parent
            found.append((name, path))
    return found


def test_the_where_to_add_section_answers_each_question():
    bullets = re.findall(r"^- \*\*([^*]+)\*\*", where_to_add(), flags=re.MULTILINE)
    assert [answer for answer in ANSWERS if not any(b.startswith(answer) for b in bullets)] == []


def test_every_file_the_where_to_add_section_names_exists():
    files = named_files(where_to_add())
    assert len(files) > 10
    assert [name for name, path in files if not path.is_file()] == []


def test_a_file_named_in_the_wrong_folder_is_caught():
    section = "- **A thing**: `augment/recipe.py` and `encodings.py`.\n- `models.py`, `tests/x.py`"
    missing = [name for name, path in named_files(section) if not path.is_file()]
    assert missing == ["encodings.py", "tests/x.py"]


@pytest.mark.parametrize(
    "subpackage",
    sorted(
        init.parent.relative_to(PACKAGE).as_posix()
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE
    ),
)
def test_every_subpackage_is_described(subpackage):
    assert re.search(rf"(?<![\w/]){re.escape(subpackage)}/(?!\w)", DOC.read_text())
