"""The command line is derived from the configuration dataclasses: one declaration per option."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from kdcache.cli.commands import cli
from kdcache.cli.options import config_options
from kdcache.config import DistillConfig, DumpConfig, SweepConfig, TrainConfig, TrainingOptions
from kdcache.logits.loss_options import TEMPERATURE
from kdcache.logits.losses import LogitsDistillationLoss
from kdcache.options import option

COMMANDS = {
    "train": TrainConfig,
    "dump-teacher": DumpConfig,
    "distill": DistillConfig,
    "sweep": SweepConfig,
}


def command_params(name: str) -> dict[str, click.Parameter]:
    command = cli.commands[name]
    return {param.name: param for param in command.params if param.name != "help"}


@pytest.mark.parametrize(("name", "config"), COMMANDS.items())
def test_every_field_is_an_option_with_the_fields_default_and_help(name, config):
    params = command_params(name)
    fields = {field.name: field for field in dataclasses.fields(config)}
    assert set(params) == set(fields)
    for field_name, field in fields.items():
        param = params[field_name]
        assert param.opts == ["--" + field_name.replace("_", "-")]
        assert param.help == field.metadata["help"]
        if field.default is dataclasses.MISSING:
            assert param.required
        elif isinstance(field.default, tuple):
            # a comma-separated list: the callback turns the shown text back into the default
            assert param.process_value(click.Context(cli.commands[name]), param.default) == (
                field.default
            )
        elif isinstance(field.default, bool):
            # off by default: --flag; on by default: a --flag/--no-flag switch
            assert isinstance(param, click.Option)
            assert param.is_flag
            assert field.default is False or bool(param.secondary_opts)
        else:
            assert param.default == field.default


def test_the_default_temperature_is_the_losses():
    assert DistillConfig(student="mlp", cache="s.zarr", out="o").temperature == TEMPERATURE.default
    assert LogitsDistillationLoss().temperature == TEMPERATURE.default
    assert command_params("distill")["temperature"].default == TEMPERATURE.default


def test_a_new_field_is_a_new_option_with_no_other_edit():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(TrainingOptions):
        warmup_epochs: int = option(2, help="Epochs of linear learning-rate warm-up.")
        schedule: str = option("cosine", choices=("cosine", "step"), help="LR schedule.")
        milestones: tuple[int, ...] = option((30, 60), example="30,60", help="Step epochs.")

    received = {}

    @click.command()
    @config_options(Extended)
    def run(**options):
        received.update(vars(Extended(**options)))

    result = CliRunner().invoke(run, ["--warmup-epochs", "5", "--milestones", "10,20"])
    assert result.exit_code == 0, result.output
    assert received["warmup_epochs"] == 5
    assert received["milestones"] == (10, 20)
    assert received["schedule"] == "cosine"
    assert received["epochs"] == 10
    help_text = " ".join(CliRunner().invoke(run, ["--help"]).output.split())
    assert (
        "--warmup-epochs INTEGER Epochs of linear learning-rate warm-up. [default: 2]" in help_text
    )
    assert CliRunner().invoke(run, ["--schedule", "linear"]).exit_code == 2  # not a choice


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undocumented(TrainingOptions):
        mystery: int = 3

    with pytest.raises(TypeError, match=r"Undocumented.mystery has no help text"):
        config_options(Undocumented)


def test_only_the_cli_imports_click():
    import ast
    from pathlib import Path

    import kdcache

    package = Path(kdcache.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == "click" or name.startswith("click.") for name in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"cli/commands.py", "cli/bench.py", "cli/bridges.py", "cli/options.py"}


def required_options() -> list[tuple[tuple[str, ...], click.Command, click.Option]]:
    """Every required option of every command, subcommands of groups (bench ...) included."""
    found = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
            return
        for param in command.params:
            if isinstance(param, click.Option) and param.required:
                found.append((path, command, param))

    walk(cli, ())
    return found


def test_the_commands_with_required_options_are_found():
    commands = {path[0] for path, _, _ in required_options()}
    assert {"train", "distill", "sweep"} <= commands


@pytest.mark.parametrize(
    ("path", "command", "missing"),
    [
        pytest.param(path, command, missing, id=" ".join((*path, missing.opts[0])))
        for path, command, missing in required_options()
    ],
)
def test_each_missing_required_option_is_a_usage_error(
    path, command, missing, monkeypatch, tmp_path
):
    # Every positional argument and every other required option given, so that only the missing
    # option is what click can complain about.
    given = [
        *("x" for param in command.params if isinstance(param, click.Argument)),
        *(
            argument
            for param in command.params
            if isinstance(param, click.Option) and param.required and param is not missing
            for argument in (param.opts[0], "x")
        ),
    ]
    monkeypatch.chdir(tmp_path)  # a run that started would write here
    result = CliRunner().invoke(cli, [*path, *given])
    assert result.exit_code == 2, result.output
    assert f"Missing option '{missing.opts[0]}'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
