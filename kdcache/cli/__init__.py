"""The ``kdcache`` command line (:mod:`~kdcache.cli.commands`), its ``bench`` group
(:mod:`~kdcache.cli.bench`) and the options built from the configuration dataclasses
(:mod:`~kdcache.cli.options`). ``main`` is the console script's entry point."""

from kdcache.cli.commands import main

__all__ = ["main"]
