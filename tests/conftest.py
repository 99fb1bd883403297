"""Shared fixtures: running the real CLI in a subprocess, tiny stores and runs on digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m kdcache ARGS`` in a fresh process, as a user would."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "kdcache", *args], cwd=cwd, env=environment,
        capture_output=True, text=True, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, one line on stderr naming ``fragments``, no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cnn teacher trained for two epochs on digits (checkpoint path)."""
    from kdcache import TrainConfig
    from kdcache.training import train

    out = tmp_path_factory.mktemp("teacher")
    train(TrainConfig(model="cnn:8", dataset="digits", out=str(out), epochs=2, batch_size=64))
    return out / "best.pt"


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory, digits_teacher: Path) -> Path:
    """A complete float32 store of the digits teacher's logits on the train split."""
    from kdcache import DumpConfig
    from kdcache.dump import dump_teacher

    out = tmp_path_factory.mktemp("stores") / "digits.zarr"
    dump_teacher(DumpConfig(teacher="cnn:8", weights=str(digits_teacher), out=str(out), encoding="float32", device="cpu"))
    return out
