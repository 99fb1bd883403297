"""Every code block of docs/integrations.md runs, in order, in one folder, as a user would run it.

Python blocks run in a fresh interpreter each (so a block that forgets an import fails); a block
after ``<!-- file: NAME -->`` is saved as NAME and run as ``python NAME`` (a later block runs it
again, e.g. under torchrun); bash blocks run with this interpreter's scripts (kdcache, torchrun)
first on PATH. A block after ``<!-- needs: MODULE -->`` runs in its own test, skipped where
MODULE is not installed. The language-model blocks find teacher/, student/ and corpus.jsonl made
by the tests' tiny-model fixtures.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_environment
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

pytest.importorskip("timm", reason="the [timm] extra is not installed")
pytest.importorskip("accelerate", reason="the [llm] extra is not installed")

PAGE = REPO_ROOT / "docs" / "integrations.md"
BLOCK = re.compile(
    r"^(?:<!-- (?P<tag>file|needs): (?P<value>\S+) -->\n)?```(?P<language>\w+)\n(?P<code>.*?)^```$",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    file: str | None = None
    needs: str | None = None


def page_blocks(text: str) -> list[Block]:
    blocks = []
    for match in BLOCK.finditer(text):
        tag, value = match["tag"], match["value"]
        blocks.append(
            Block(
                match["language"],
                match["code"],
                file=value if tag == "file" else None,
                needs=value if tag == "needs" else None,
            )
        )
    return blocks


def run_block(block: Block, folder: Path) -> None:
    environment = cli_environment()
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment["PATH"]])
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    elif block.language == "python" and block.file:
        (folder / block.file).write_text(block.code)
        command = [sys.executable, block.file]
    elif block.language == "python":
        command = [sys.executable, "-c", block.code]
    else:
        raise AssertionError(f"a {block.language} block in {PAGE.name}: only python and bash run")
    result = subprocess.run(
        command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{block.code}\nfailed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def page_folder(lm_files, tmp_path_factory) -> Path:
    """The folder after every block that needs nothing more has run."""
    folder = tmp_path_factory.mktemp("integrations")
    for name in ("teacher", "student"):
        shutil.copytree(lm_files[name], folder / name)
    shutil.copy(lm_files["corpus"], folder / "corpus.jsonl")
    for block in page_blocks(PAGE.read_text()):
        if block.needs is None:
            run_block(block, folder)
    return folder


def test_every_block_of_the_integrations_page_runs(page_folder):
    for output in ("digits.zarr", "timm-kd/last.pt", "digits32.zarr", "hf-kd/final/config.json"):
        assert (page_folder / output).exists(), output


def test_the_blocks_that_need_an_optional_package_run_where_it_is_installed(page_folder):
    needing = [block for block in page_blocks(PAGE.read_text()) if block.needs]
    assert needing, "the page shows no block that needs TRL any more: drop this test"
    for block in needing:
        assert block.needs is not None
        if importlib.util.find_spec(block.needs) is None:
            pytest.skip(f"{block.needs} is not installed")
        run_block(block, page_folder)


def test_the_blocks_are_found():
    blocks = page_blocks(
        "<!-- file: a.py -->\n```python\nprint(1)\n```\n\n<!-- needs: trl -->\n```python\nx\n```\n"
        "```bash\nls\n```\n"
    )
    assert blocks == [
        Block("python", "print(1)\n", file="a.py"),
        Block("python", "x\n", needs="trl"),
        Block("bash", "ls\n"),
    ]
    assert len(page_blocks(PAGE.read_text())) >= 8
