"""The [llm] extra is optional: the core imports without it, and its absence is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdcache.errors import ConfigError
from kdcache.lm._hf import require_transformers


def test_missing_transformers_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[llm\]"'):
        require_transformers()


def test_the_package_and_the_lm_modules_import_without_transformers():
    code = (
        "import sys; import kdcache, kdcache.lm.loop, kdcache.lm.dump, kdcache.cli.commands; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
