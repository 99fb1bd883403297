"""How a configuration field is declared and checked: :func:`option`, :class:`Options`.

The building blocks of :mod:`kdcache.config`'s dataclasses; like it, this imports without click
(the command line reads the field metadata that :func:`option` records).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar

from kdcache.errors import ConfigError

T = TypeVar("T")

#: The kinds of run: image classifiers, and causal language models over text.
IMAGE, LM = "image", "lm"
MODALITY_NAMES = {IMAGE: "image models", LM: "language models"}


@dataclass(frozen=True)
class Bounds:
    """The numbers a numeric option accepts: ``low`` to ``high``, both included unless
    ``above_low`` or ``below_high`` (then that end is refused); integers only unless ``real``.
    NaN and the infinities never pass, nor a bool.

    The upper bounds keep every accepted value within what torch and numpy take (a seed, a
    float32 step), so that an absurd number is refused in one line before anything runs.
    """

    low: int | float
    high: int | float
    real: bool = False
    above_low: bool = False
    below_high: bool = False

    def admits(self, value: Any) -> bool:
        kind = numbers.Real if self.real else numbers.Integral
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        number: Any = value
        # Comparisons, not math.isfinite: NaN fails them, and a huge int never overflows them.
        above = self.low < number if self.above_low else self.low <= number
        below = number < self.high if self.below_high else number <= self.high
        return bool(above and below)

    def describe(self) -> str:
        if self.real:
            return (
                f"a number in {'(' if self.above_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.below_high else ']'}"
            )
        return f"an integer from {self.low:,} to {self.high:,}"


def option(
    default: Any = MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    path: str | None = None,
    example: str | None = None,
    only: str | None = None,
    bounds: Bounds | None = None,
    multiple: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option ``--field-name``.

    The option's type and default come from the field; ``help`` is its help text, ``choices``
    the values it accepts, ``path`` ``"file"`` or ``"dir"`` for a path option, and ``example``
    a value shown when a comma-separated list (a ``tuple`` field) cannot be read. ``only``
    (:data:`IMAGE` or :data:`LM`) marks an option that means something for that kind of run alone:
    :func:`refuse_foreign_options` refuses it, when set, for the other kind. ``bounds`` are the
    numbers a numeric option (or each item of a list) accepts; :class:`Options` checks them for
    the API and the command line alike (None is left to the field's own checks). ``multiple``
    makes a text option repeatable (``--cache a --cache b``): the command line passes a tuple.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "path": path,
        "example": example,
        "only": only,
        "bounds": bounds,
        "multiple": multiple,
    }
    return dataclasses.field(
        default=default, metadata={key: value for key, value in metadata.items() if value}
    )


def parse_list(text: str, kind: Callable[[str], T], *, option: str, example: str) -> tuple[T, ...]:
    """Values of a comma-separated option such as ``--temperatures 1,2,4``."""
    try:
        values = tuple(kind(part.strip()) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"{option} must be a comma-separated list, got {text!r}; e.g. {option} {example}"
        ) from None
    return values


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every configuration: a validation hook each subclass extends, and a dict form."""

    def __post_init__(self) -> None:
        """Validate; each subclass checks its own fields, then calls ``super().__post_init__()``,
        which ends here: every field declared with ``bounds`` is checked against them."""
        for field in dataclasses.fields(self):
            bounds = field.metadata.get("bounds")
            value = getattr(self, field.name)
            if bounds is not None and value is not None:
                check_bounds(field.name, value, bounds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{key: value for key, value in data.items() if key in known})


def check_bounds(name: str, value: Any, bounds: Bounds) -> None:
    """Refuse, in one line naming the option ``--name`` and the valid range, a ``value`` (or an
    item of a list value) outside ``bounds``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, tuple | list):
        for item in value:
            require(
                bounds.admits(item),
                f"{flag} lists {item!r}; each must be {bounds.describe()}",
            )
        return
    require(bounds.admits(value), f"{flag} must be {bounds.describe()}, got {value!r}")


def refuse_foreign_options(config: Options, modality: str) -> None:
    """Refuse, in one line naming it, the first option of ``config`` set away from its default
    that means nothing for a ``modality`` run (declared with ``option(only=...)``)."""
    for field in dataclasses.fields(config):
        only = field.metadata.get("only")
        if only is None or only == modality or getattr(config, field.name) == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        raise ConfigError(
            f"{flag} applies to {MODALITY_NAMES[only]} only; drop it for {MODALITY_NAMES[modality]}"
        )
