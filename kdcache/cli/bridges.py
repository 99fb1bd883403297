"""The ``kdcache concat``, ``kdcache import FORMAT`` and ``kdcache export distillkit`` commands:
thin layers over :mod:`kdcache.store.tools.concat` and :mod:`kdcache.store.bridges` (see
docs/merging.md), their options built from :mod:`kdcache.store_config`.
:mod:`kdcache.cli.commands` adds them to the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdcache.cli.options import config_options
from kdcache.errors import ConfigError
from kdcache.store_config import (
    ConcatConfig,
    ExportDistillkitConfig,
    ImportDistillkitConfig,
    ImportFkdConfig,
    ImportMegatronConfig,
    ImportOptions,
    ImportTinyvitConfig,
)
from kdcache.wording import counted


def _store_options(config: ImportOptions) -> dict[str, Any]:
    """The keyword arguments every import function takes, from ``config``."""
    return {
        "encoding": config.encoding,
        "teacher": config.teacher,
        "chunk_rows": config.chunk_rows,
        "overwrite": config.overwrite,
        "fsync": config.fsync,
    }


def _lines(path: str | None) -> list[str] | None:
    """The non-empty lines of the text file ``path`` (``None`` for no file)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the list {path}: {error}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@click.command()
@click.argument("sources", nargs=-1, required=True)
@config_options(ConcatConfig)
def concat(sources: tuple[str, ...], **options: Any) -> None:
    """Join stores of disjoint parts of one dataset (SOURCES) into one store OUT.

    Each source records which samples it holds (`kdcache convert --indices` writes them); together
    they must hold every sample once. Rows are copied in their encoding, chunk by chunk; with
    --link none is: OUT names the sources, which stay where they are and must not change.
    """
    config = ConcatConfig(**options)
    from kdcache.store.tools.concat import concat_stores, link_stores

    result = (
        link_stores(list(sources), config.out, overwrite=config.overwrite)
        if config.link
        else concat_stores(
            list(sources),
            config.out,
            overwrite=config.overwrite,
            chunk_rows=config.chunk_rows,
            fsync=config.fsync,
        )
    )
    views = f" V={result.views}" if result.views > 1 else ""
    click.echo(
        f"{'linked' if config.link else 'joined'} {counted(result.num_sources, 'store')} into "
        f"{result.out}: N={result.num_samples}{views} {result.encoding}"
    )


@click.group("import")
def import_group() -> None:
    """Import soft labels another tool wrote into a new kdcache store (see docs/merging.md)."""


@import_group.command("distillkit")
@click.argument("source", type=click.Path())
@config_options(ImportDistillkitConfig)
def import_distillkit_command(source: str, **options: Any) -> None:
    """Import a DistillKit logit set (a folder of data_*.parquet files) as a token store."""
    config = ImportDistillkitConfig(**options)
    from kdcache.store.bridges.distillkit import import_distillkit

    result = import_distillkit(
        source,
        config.out,
        config=config.config,
        vocab_size=config.vocab_size,
        **_store_options(config),
    )
    click.echo(
        f"imported {source} into {result.out}: {counted(result.num_samples, 'sequence')}, "
        f"{counted(result.num_tokens, 'token')}, V={result.num_classes} {result.encoding}"
    )


@import_group.command("megatron")
@click.argument("source", type=click.Path(file_okay=False))
@config_options(ImportMegatronConfig)
def import_megatron_command(source: str, **options: Any) -> None:
    """Import Megatron-LM's offline-logit tar shards (cp*_dp*__*.tar) as a token store."""
    config = ImportMegatronConfig(**options)
    import numpy as np

    from kdcache.store.bridges.megatron import import_megatron

    try:
        tokens = np.load(config.tokens, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read --tokens {config.tokens} as a .npy array: {error}"
        ) from None
    result = import_megatron(
        source,
        config.out,
        tokens=tokens,
        vocab_size=config.vocab_size,
        **_store_options(config),
    )
    click.echo(
        f"imported {source} into {result.out}: {counted(result.num_samples, 'sequence')}, "
        f"{counted(result.num_tokens, 'token')}, V={result.num_classes} {result.encoding}"
    )


@import_group.command("tinyvit")
@click.argument("source", type=click.Path(file_okay=False))
@config_options(ImportTinyvitConfig)
def import_tinyvit_command(source: str, **options: Any) -> None:
    """Import one epoch of TinyViT's saved logits (a logits_top{k}_epoch{e} folder)."""
    config = ImportTinyvitConfig(**options)
    from kdcache.store.bridges.tinyvit import import_tinyvit

    result = import_tinyvit(
        source,
        config.out,
        num_classes=config.num_classes,
        top_k=config.top_k,
        keys=_lines(config.keys),
        num_samples=config.num_samples,
        **_store_options(config),
    )
    click.echo(
        f"imported {source} into {result.out}: N={result.num_samples} C={result.num_classes} "
        f"top-{result.k} {result.encoding}"
    )


@import_group.command("fkd")
@click.argument("source", type=click.Path(file_okay=False))
@config_options(ImportFkdConfig)
def import_fkd_command(source: str, **options: Any) -> None:
    """Import FKD's soft-label files (one .tar per image) as a store of one view per crop."""
    config = ImportFkdConfig(**options)
    from kdcache.store.bridges.fkd import import_fkd

    result = import_fkd(
        source,
        config.out,
        num_classes=config.num_classes,
        files=_lines(config.files),
        classes=_lines(config.classes),
        input_size=config.input_size,
        **_store_options(config),
    )
    click.echo(
        f"imported {source} into {result.out}: N={result.num_samples} V={result.views} "
        f"C={result.num_classes} top-{result.k} {result.encoding}"
    )


@click.group("export")
def export_group() -> None:
    """Write a kdcache store in another tool's layout (see docs/merging.md)."""


@export_group.command("distillkit")
@click.argument("store")
@click.argument("out", type=click.Path(file_okay=False))
@config_options(ExportDistillkitConfig)
def export_distillkit_command(store: str, out: str, **options: Any) -> None:
    """Write the token STORE as a DistillKit logit set in the new folder OUT."""
    config = ExportDistillkitConfig(**options)
    from kdcache.store.bridges.distillkit import export_distillkit

    result = export_distillkit(store, out, top_k=config.top_k, rows_per_file=config.rows_per_file)
    click.echo(
        f"exported {store} into {result.out}: {counted(result.num_samples, 'sequence')} in "
        f"{counted(result.num_files, 'file')}, top-{result.k} log-probs per token"
    )
