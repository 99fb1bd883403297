"""Regenerate the command reference in docs/cli.md from the CLI's own help text.

Usage: python pipelines/cli_reference.py [--check]
With --check, exit 1 if docs/cli.md is out of date instead of rewriting it (the tests do this).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kdcache.cli.commands import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
MARKER = "<!-- generated below by pipelines/cli_reference.py; do not edit by hand -->"


def command_help(command: click.Command, name: str, parent: click.Context | None) -> str:
    context = click.Context(
        command, info_name=name, parent=parent, terminal_width=100, max_content_width=100
    )
    return command.get_help(context)


def reference() -> str:
    root = click.Context(cli, info_name="kdcache", terminal_width=100, max_content_width=100)
    sections = [f"## kdcache\n\n```text\n{command_help(cli, 'kdcache', None)}\n```\n"]
    for name in sorted(cli.list_commands(root)):
        command = cli.get_command(root, name)
        assert command is not None
        sections.append(f"## kdcache {name}\n\n```text\n{command_help(command, name, root)}\n```\n")
        if isinstance(command, click.Group):  # e.g. `kdcache bench feed`
            group = click.Context(
                command, info_name=name, parent=root, terminal_width=100, max_content_width=100
            )
            for sub_name in sorted(command.list_commands(group)):
                sub = command.get_command(group, sub_name)
                assert sub is not None
                sections.append(
                    f"## kdcache {name} "
                    f"{sub_name}\n\n```text\n{command_help(sub, sub_name, group)}\n```\n"
                )
    return "\n".join(sections)


def main() -> int:
    intro = DOC.read_text().split(MARKER)[0] if DOC.exists() else "# Command-line reference\n\n"
    updated = f"{intro}{MARKER}\n\n{reference()}"
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != updated:
            print(f"{DOC} is out of date: run python pipelines/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
