"""kdcache.store_config: the store commands' options, each declared once, refused in one line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kdcache.cli.commands import cli
from kdcache.errors import ConfigError
from kdcache.store_config import ConcatConfig, ImportFkdConfig, MergeConfig

WRITERS = [
    ["convert"],
    ["merge"],
    ["concat"],
    ["import", "distillkit"],
    ["import", "megatron"],
    ["import", "tinyvit"],
    ["import", "fkd"],
]


@pytest.mark.parametrize("command", WRITERS, ids=" ".join)
def test_every_store_writing_command_takes_the_new_store_options(command):
    shown = CliRunner().invoke(cli, [*command, "--help"]).output
    for flag in ("--chunk-rows", "--overwrite", "--fsync / --no-fsync"):
        assert flag in shown, f"kdcache {' '.join(command)} lacks {flag}"


def test_bad_values_are_refused_in_one_line_naming_the_option():
    with pytest.raises(ConfigError, match=r"^--chunk-rows sizes copied rows; --link copies none"):
        ConcatConfig(out="all.zarr", link=True, chunk_rows=8)
    with pytest.raises(ConfigError, match=r"^--input-size must be an integer from 1 to"):
        ImportFkdConfig(out="fkd.zarr", input_size=0)
    with pytest.raises(ConfigError, match=r"^unknown --mode 'median'; valid choices: mean"):
        MergeConfig(out="merged.zarr", mode="median")
