"""A CLI call imports only what it uses: help and store checks never wait for torchvision.

Each case runs ``python -X importtime -m kdcache ARGS`` in a fresh process and reads the modules
it imported from the import-time report on stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_environment

from kdcache.store.write.writer import create_store

#: The modules a call must not import: torchvision and the model and training code.
HEAVY = {"torchvision", "kdcache.models", "kdcache.train", "kdcache.lm.models"}


def imported_modules(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kdcache", *args],
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        line.rpartition("|")[2].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }


def test_version_and_help_import_no_torch() -> None:
    # dump-teacher's help lists the registries' entries (encodings, dataset kinds, models, recipe
    # operations) read from their source, not imported.
    for args in (("--version",), ("distill", "--help"), ("dump-teacher", "--help")):
        modules = imported_modules(*args)
        assert "kdcache.cli.commands" in modules, "the import-time report was not read"
        assert not {"torch", *HEAVY} & modules, f"kdcache {' '.join(args)} imported torch"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "tiny.zarr"
    writer = create_store(path, num_samples=10, num_classes=3, chunk_rows=5)
    writer.write(np.arange(10), np.zeros((10, 3)))
    writer.finalize()
    return path


def test_verify_imports_no_torchvision_nor_models(tiny_store: Path) -> None:
    modules = imported_modules("verify", str(tiny_store))
    assert "kdcache.store.tools.verify" in modules
    assert not HEAVY & modules, sorted(HEAVY & modules)
