"""Click options built from the configuration dataclasses.

One declaration per option: :func:`config_options` reads each field's type, default, choices
and help (declared with :func:`kdcache.config.option`), so the command line, ``config.json`` and
``docs/cli.md`` cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from types import UnionType
from typing import Any, TypeVar

import click

from kdcache.config import SpeedOptions
from kdcache.options import parse_list

F = TypeVar("F", bound=Callable[..., Any])


def config_options(config: type) -> Callable[[F], F]:
    """Click options for every field of the configuration dataclass ``config``.

    Each option's name, type, default, choices and help come from its field (declared with
    :func:`kdcache.config.option`): required fields first, then each class's own fields from the
    most derived class down. A ``tuple`` field is a comma-separated list.
    """
    hints = typing.get_type_hints(config)
    fields = {field.name: field for field in dataclasses.fields(config)}
    ordered: dict[str, dataclasses.Field] = {}
    for klass in config.__mro__:
        for name in vars(klass).get("__annotations__", {}):
            if name in fields:
                ordered.setdefault(name, fields[name])
    required_first = sorted(ordered.values(), key=lambda f: f.default is not dataclasses.MISSING)
    options = [_click_option(field, hints[field.name], config) for field in required_first]

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _click_option(field: dataclasses.Field, kind: Any, config: type) -> Callable[[F], F]:
    meta = field.metadata
    if "help" not in meta:
        raise TypeError(
            f"{config.__name__}.{field.name} has no help text: declare it with "
            "kdcache.config.option(default, help=...)"
        )
    name = "--" + field.name.replace("_", "-")
    required = field.default is dataclasses.MISSING
    default = None if required else field.default
    if kind is bool:
        if default:  # a switch that is on unless turned off: --fsync/--no-fsync
            flag = field.name.replace("_", "-")
            return click.option(f"--{flag}/--no-{flag}", default=True, help=meta["help"])
        return click.option(name, is_flag=True, help=meta["help"])
    settings: dict[str, Any] = {"help": meta["help"], "required": required}
    if meta.get("multiple"):
        return click.option(name, multiple=True, type=_text_type(meta), default=default, **settings)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(item, UnionType):  # int | str: a number where it reads as one
            item = _number_or_text
        example = meta["example"]

        def parse(context: click.Context, parameter: click.Parameter, text: str | None) -> Any:
            if text is None:
                return field.default
            return parse_list(text, item, option=name, example=example)

        settings.update(type=str, callback=parse)
        values: tuple[Any, ...] = field.default  # type: ignore[assignment]
        joined = ",".join(f"{value:g}" if item is float else str(value) for value in values)
        default = joined or None
    else:
        types = set(typing.get_args(kind) or (kind,)) - {type(None)}
        settings["type"] = (
            _text_type(meta) if str in types or len(types) != 1 else next(iter(types))
        )
    if not required:
        # click >= 8.3 counts an explicit default=None as a value and skips the required check.
        settings.update(default=default, show_default=default is not None)
    return click.option(name, **settings)


def _number_or_text(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _text_type(meta: Any) -> click.ParamType:
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if meta.get("path") == "file":
        return click.Path(dir_okay=False)
    if meta.get("path") == "dir":
        return click.Path(file_okay=False)
    return click.STRING


def speed_options(function: F) -> F:
    """How inputs reach the device and how the models compute (docs/benchmarks.md#gpu): the
    fields of :class:`~kdcache.config.SpeedOptions`."""
    return config_options(SpeedOptions)(function)
