"""The documentation stays in step with the code."""

from __future__ import annotations

import os
import subprocess
import sys

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
