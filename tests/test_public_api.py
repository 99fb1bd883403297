"""The package root's public names: each resolves, and a subpackage of the same name (the
``kdcache.train`` subpackage and the ``train`` function) never hides the public one."""

from __future__ import annotations

import subprocess
import sys

from conftest import cli_environment


def test_every_public_name_resolves_to_what_its_module_defines():
    import kdcache

    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None, name


def test_train_stays_the_function_after_its_subpackage_is_imported():
    script = (
        "import kdcache.train.loop, kdcache.train.sweep\n"
        "from kdcache import distill, train\n"
        "import sys, kdcache\n"
        "assert train is kdcache.train is sys.modules['kdcache.train.loop'].train, train\n"
        "assert callable(distill)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=cli_environment(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
