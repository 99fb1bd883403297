"""Every code block of docs/integrations.md runs, in order, in one folder, as a user would run it.

Python blocks run each in a fresh namespace of a fresh process, forked from one interpreter that
imported the heavy third-party packages (:data:`PRELOADED`) once (tests/warm_interpreter.py), so
that each block does not pay their seconds again; a block that forgets an import still fails,
and nothing of kdcache is imported before a block imports it. A block after
``<!-- file: NAME -->`` is saved as NAME and run as the script NAME (a later block runs it
again, e.g. under torchrun); bash blocks run with this interpreter's scripts (kdcache, torchrun)
first on PATH. A block after
``<!-- needs: MODULE -->`` runs in its own test, skipped where MODULE is not installed. The
language-model blocks find teacher/, student/ and corpus.jsonl made by the tests' tiny-model
fixtures.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_environment
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from warm_interpreter import WarmInterpreter

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


#: What the block runner imports before forking each block's process: every block, or the
#: library code it calls, imports these anyway. Top-level packages only, so that a block relying on
#: a submodule it never imported fails here as it would for a user.
PRELOADED = ("torch", "torchvision", "timm", "transformers")

#: The longest a block may run.
BLOCK_TIMEOUT_S = 600


def block_environment() -> dict[str, str]:
    environment = cli_environment()
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment["PATH"]])
    return environment


class BlockRunner:
    """Runs python blocks in processes forked from one interpreter started in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        preloaded = tuple(name for name in PRELOADED if importlib.util.find_spec(name))
        self.interpreter = WarmInterpreter(preloaded, env=block_environment(), cwd=folder)

    def run(self, block: Block) -> tuple[int, str]:
        """The block's exit status and output."""
        status, output, _ = self.interpreter.run(
            [block.file or "-c"],
            cwd=self.folder,
            code=block.code,
            timeout=BLOCK_TIMEOUT_S,
            merge_output=True,
        )
        return status, output

    def close(self) -> None:
        self.interpreter.close()


def run_block(block: Block, folder: Path, runner: BlockRunner) -> None:
    if block.language == "python":
        if block.file:
            (folder / block.file).write_text(block.code)
        status, output = runner.run(block)
    elif block.language == "bash":
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=folder,
            env=block_environment(),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        status, output = result.returncode, result.stderr
    else:
        raise AssertionError(f"a {block.language} block in {PAGE.name}: only python and bash run")
    assert status == 0, f"{block.code}\nfailed:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def runner(page_folder_path: Path) -> Iterator[BlockRunner]:
    block_runner = BlockRunner(page_folder_path)
    yield block_runner
    block_runner.close()


@pytest.fixture(scope="module")
def page_folder_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrations")


@pytest.fixture(scope="module")
def page_folder(lm_files, page_folder_path: Path, runner: BlockRunner) -> Path:
    """The folder after every block that needs nothing more has run."""
    folder = page_folder_path
    for name in ("teacher", "student"):
        shutil.copytree(lm_files[name], folder / name)
    shutil.copy(lm_files["corpus"], folder / "corpus.jsonl")
    for block in page_blocks(PAGE.read_text()):
        if block.needs is None:
            run_block(block, folder, runner)
    return folder


def test_every_block_of_the_integrations_page_runs(page_folder):
    outputs = ("digits.zarr", "timm-kd/last.pt", "digits32.zarr", "timm-loop.pth")
    for output in (*outputs, "hf-kd/final/config.json"):
        assert (page_folder / output).exists(), output


@pytest.mark.parametrize(
    ("package", "output"), [("lightning", "lightning-kd/last.ckpt"), ("trl", "sft-kd")]
)
def test_the_blocks_that_need_an_optional_package_run_where_it_is_installed(
    page_folder, runner, package, output
):
    needing = [block for block in page_blocks(PAGE.read_text()) if block.needs == package]
    assert needing, f"the page shows no block that needs {package} any more: drop it here"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    for block in needing:
        run_block(block, page_folder, runner)
    assert (page_folder / output).exists(), output


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


def test_a_block_that_forgets_an_import_fails_though_the_runner_imported_it(
    page_folder_path, runner
):
    with pytest.raises(AssertionError, match="NameError: name 'torch' is not defined"):
        run_block(Block("python", "torch.zeros(1)\n"), page_folder_path, runner)
    run_block(Block("python", "import torch\n\ntorch.zeros(1)\n"), page_folder_path, runner)
