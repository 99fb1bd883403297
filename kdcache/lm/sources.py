"""Reading a language-model dataset's rows from disk: UTF-8 text, and one column of a table.

The tables are JSON Lines files (``jsonl:``), Parquet files (``parquet:``, needs pyarrow) and
``datasets.Dataset.save_to_disk`` folders (``hfdisk:``, needs datasets), all local. A column holds
either documents (strings) or conversations (lists of ``{"role", "content"}`` dicts, a
``messages`` column); without a COLUMN in the spec, ``text`` is read where the table has one,
else ``messages``. pyarrow and datasets are imported only when such a file is read.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import ConfigError, DatasetNotFoundError, SpecError

#: The columns read when the spec names none, in this order of preference.
DEFAULT_COLUMNS = ("text", "messages")
#: The extra that provides pyarrow and datasets.
DATA_EXTRA = "llm-data"


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file; a missing, binary or undecodable file is refused in one line."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"no text file at {path}; pass text:FILE with a local .jsonl or plain-text file"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetNotFoundError(
            f"cannot read {path} ({error.strerror or error}); pass a readable text file"
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(
            f"{path} holds a NUL byte at offset {nul}, so it is binary, not text; pass a UTF-8 "
            ".jsonl or plain-text file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "convert it to UTF-8 (e.g. iconv -t UTF-8) and pass it again"
        ) from None


def json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSON Lines ``text``."""
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise SpecError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        except (ValueError, RecursionError) as error:  # a number of 4300+ digits, deep nesting
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:60]
            raise SpecError(f"{path}:{number} is JSON kdcache cannot read ({reason})") from None
    return values


@dataclass(frozen=True)
class Column:
    """One column of a table: its name, and its values in row order (strings or
    conversations, checked by :func:`kind_of`)."""

    name: str
    values: list[Any]


def _require(module: str, kind: str) -> Any:
    """``module`` imported, or a one-line error naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]
        raise ConfigError(
            f"{kind}: datasets need {package}, which is not installed; install it with "
            f'pip install -e ".[{DATA_EXTRA}]"'
        ) from None


def _chosen(path: Path, names: Sequence[str], column: str | None) -> str:
    if column is not None:
        if column not in names:
            raise SpecError(
                f"{path} has no column {column!r}; its columns are {', '.join(map(repr, names))}"
            )
        return column
    for name in DEFAULT_COLUMNS:
        if name in names:
            return name
    raise SpecError(
        f"{path} has neither a 'text' nor a 'messages' column (it has "
        f"{', '.join(map(repr, names[:10]))}); name the column: KIND:PATH:COLUMN"
    )


def _jsonl_column(path: Path, column: str | None) -> Column:
    rows = json_lines(path, read_utf8(path))
    if not rows:
        raise SpecError(f"{path} has no rows; give it at least 10 (every 10th is held out)")
    for number, row in rows:
        if not isinstance(row, dict):
            raise SpecError(
                f"{path}:{number} is not a JSON object; each line of a jsonl: dataset must be an "
                'object such as {"text": "..."} or {"messages": [...]}'
            )
    name = _chosen(path, list(rows[0][1]), column)
    values = []
    for number, row in rows:
        if name not in row:
            raise SpecError(f"{path}:{number} has no {name!r} field; give every line one")
        values.append(row[name])
    return Column(name, values)


def _parquet_column(path: Path, column: str | None) -> Column:
    parquet = _require("pyarrow.parquet", "parquet")
    import pyarrow

    if not path.is_file():
        raise DatasetNotFoundError(f"no Parquet file at {path}; pass parquet:FILE[:COLUMN]")
    try:
        names = parquet.read_schema(path).names
        name = _chosen(path, names, column)
        table = parquet.read_table(path, columns=[name])
    except (pyarrow.ArrowException, OSError) as error:
        raise SpecError(
            f"{path} is not a Parquet file kdcache can read ({str(error)[:80]}); pass a Parquet "
            "file written by pyarrow, pandas or datasets"
        ) from None
    return Column(name, table.column(name).to_pylist())


def _hfdisk_column(path: Path, column: str | None) -> Column:
    datasets = _require("datasets", "hfdisk")
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"no folder at {path}; pass hfdisk:FOLDER naming a datasets save_to_disk folder"
        )
    datasets.utils.logging.disable_progress_bar()
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise SpecError(
            f"{path} is not a folder written by datasets' save_to_disk ({str(error)[:80]}); "
            "pass one"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        raise SpecError(
            f"{path} holds a DatasetDict of splits {', '.join(splits)}; pass one of them, e.g. "
            f"hfdisk:{path / splits[0]} (kdcache holds out every 10th row itself)"
        )
    name = _chosen(path, loaded.column_names, column)
    table = loaded.select_columns([name]).with_format("arrow")[:]
    return Column(name, table.column(name).to_pylist())


#: Readers of each table kind's column.
READERS = {"jsonl": _jsonl_column, "parquet": _parquet_column, "hfdisk": _hfdisk_column}


def read_column(kind: str, path: Path, column: str | None) -> Column:
    """The column ``column`` (or the default one) of the ``kind`` table at ``path``."""
    return READERS[kind](path, column)


def kind_of(column: Column, where: Path) -> str:
    """``"text"`` when every value is a string, ``"chat"`` when every one is a list (a
    conversation); a mixed or other column is refused naming its first odd row."""
    if not column.values:
        raise SpecError(f"{where} has no rows; give it at least 10 (every 10th is held out)")
    first = column.values[0]
    text = isinstance(first, str)
    for row, value in enumerate(column.values):
        if isinstance(value, str) != text or not isinstance(value, str | list):
            raise SpecError(
                f"{where}: row {row} of column {column.name!r} holds {type(value).__name__}; a "
                "column must hold strings (documents) or lists of {role, content} (conversations)"
            )
    return "text" if text else "chat"
