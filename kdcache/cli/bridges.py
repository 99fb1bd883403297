"""The ``kdcache concat``, ``kdcache import FORMAT`` and ``kdcache export distillkit`` commands:
thin layers over :mod:`kdcache.store.tools.concat` and :mod:`kdcache.store.bridges` (see
docs/merging.md). :mod:`kdcache.cli.commands` adds them to the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kdcache.errors import ConfigError
from kdcache.wording import counted

_ENCODING_HELP = (
    "The new store's encoding [default: topk:K, which keeps the K stored log-probs exactly]."
)


def _store_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options every import shares."""
    for decorator in reversed(
        [
            click.option("--out", required=True, help="The new store (a path or URL)."),
            click.option("--encoding", default=None, help=_ENCODING_HELP),
            click.option("--teacher", default=None, help="The teacher's name, recorded in OUT."),
            click.option(
                "--chunk-rows",
                type=click.IntRange(min=1),
                default=None,
                help="Rows per Zarr chunk [default: about 1 MiB per chunk].",
            ),
            click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT."),
        ]
    ):
        function = decorator(function)
    return function


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
@click.option("--out", required=True, help="The joined store (a path or URL).")
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per Zarr chunk of OUT [default: about 1 MiB per chunk].",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT.")
@click.option(
    "--link",
    is_flag=True,
    help="Copy nothing: OUT is a small joined store that reads SOURCES in place, by path or URL "
    "and digest (image stores).",
)
def concat(
    sources: tuple[str, ...], out: str, chunk_rows: int | None, overwrite: bool, link: bool
) -> None:
    """Join stores of disjoint parts of one dataset (SOURCES) into one store OUT.

    Each source records which samples it holds (`kdcache convert --indices` writes them); together
    they must hold every sample once. Rows are copied in their encoding, chunk by chunk; with
    --link none is: OUT names the sources, which stay where they are and must not change.
    """
    from kdcache.store.tools.concat import concat_stores, link_stores

    if link and chunk_rows is not None:
        raise click.BadParameter("--chunk-rows sizes copied rows; --link copies none: drop it")
    result = (
        link_stores(list(sources), out, overwrite=overwrite)
        if link
        else concat_stores(list(sources), out, overwrite=overwrite, chunk_rows=chunk_rows)
    )
    views = f" V={result.views}" if result.views > 1 else ""
    click.echo(
        f"{'linked' if link else 'joined'} {counted(result.num_sources, 'store')} into "
        f"{result.out}: N={result.num_samples}{views} {result.encoding}"
    )


@click.group("import")
def import_group() -> None:
    """Import soft labels another tool wrote into a new kdcache store (see docs/merging.md)."""


@import_group.command("distillkit")
@click.argument("source", type=click.Path())
@_store_options
@click.option(
    "--config",
    "config_file",
    default=None,
    help="DistillKit's compression_config.yaml [default: the one beside the files].",
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=2),
    default=None,
    help="The teacher's vocabulary [default: the config's d].",
)
def import_distillkit_command(
    source: str, config_file: str | None, vocab_size: int | None, **options: Any
) -> None:
    """Import a DistillKit logit set (a folder of data_*.parquet files) as a token store."""
    from kdcache.store.bridges.distillkit import import_distillkit

    result = import_distillkit(
        source, options.pop("out"), config=config_file, vocab_size=vocab_size, **options
    )
    click.echo(
        f"imported {source} into {result.out}: {counted(result.num_samples, 'sequence')}, "
        f"{counted(result.num_tokens, 'token')}, V={result.num_classes} {result.encoding}"
    )


@import_group.command("megatron")
@click.argument("source", type=click.Path(file_okay=False))
@_store_options
@click.option(
    "--tokens",
    "tokens_file",
    required=True,
    help="A .npy (N, S + 1) array: the token ids of the samples the "
    "shards hold, in training order (Megatron's shards hold none).",
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=2),
    default=None,
    help="Required: the teacher's vocabulary (its padded output width).",
)
def import_megatron_command(
    source: str, tokens_file: str, vocab_size: int | None, **options: Any
) -> None:
    """Import Megatron-LM's offline-logit tar shards (cp*_dp*__*.tar) as a token store."""
    import numpy as np

    from kdcache.store.bridges.megatron import import_megatron

    try:
        tokens = np.load(tokens_file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read --tokens {tokens_file} as a .npy array: {error}") from None
    result = import_megatron(
        source, options.pop("out"), tokens=tokens, vocab_size=vocab_size, **options
    )
    click.echo(
        f"imported {source} into {result.out}: {counted(result.num_samples, 'sequence')}, "
        f"{counted(result.num_tokens, 'token')}, V={result.num_classes} {result.encoding}"
    )


@import_group.command("tinyvit")
@click.argument("source", type=click.Path(file_okay=False))
@_store_options
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Required: the teacher's classes (1000, or 21841 for ImageNet-22k).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="k of the records [default: from the folder name logits_top{k}_epoch{e}].",
)
@click.option(
    "--keys",
    "keys_file",
    default=None,
    help="The dataset's keys in sample order, one per line [default: keys are indices].",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Samples of the dataset [default: the keys' count, or the largest index + 1].",
)
def import_tinyvit_command(
    source: str,
    num_classes: int | None,
    top_k: int | None,
    keys_file: str | None,
    num_samples: int | None,
    **options: Any,
) -> None:
    """Import one epoch of TinyViT's saved logits (a logits_top{k}_epoch{e} folder)."""
    from kdcache.store.bridges.tinyvit import import_tinyvit

    result = import_tinyvit(
        source,
        options.pop("out"),
        num_classes=num_classes,
        top_k=top_k,
        keys=_lines(keys_file),
        num_samples=num_samples,
        **options,
    )
    click.echo(
        f"imported {source} into {result.out}: N={result.num_samples} C={result.num_classes} "
        f"top-{result.k} {result.encoding}"
    )


@import_group.command("fkd")
@click.argument("source", type=click.Path(file_okay=False))
@_store_options
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Required: the teacher's classes (1000 for ImageNet).",
)
@click.option(
    "--files",
    "files_list",
    default=None,
    help="The label files (relative to SOURCE) in sample order, one per line "
    "[default: sorted paths, ImageFolder's order].",
)
@click.option(
    "--classes",
    "classes_list",
    default=None,
    help="The teacher's class folder names in label order, one per line [default: the class "
    "folders present, sorted; they must then number --num-classes].",
)
@click.option(
    "--input-size",
    type=click.IntRange(min=1),
    default=None,
    help="Required: the side S of kdcache's square dataset inputs: FKD's boxes (fractions of "
    "the image) become pixel boxes of them.",
)
def import_fkd_command(
    source: str,
    num_classes: int | None,
    files_list: str | None,
    classes_list: str | None,
    input_size: int | None,
    **options: Any,
) -> None:
    """Import FKD's soft-label files (one .tar per image) as a store of one view per crop."""
    from kdcache.store.bridges.fkd import import_fkd

    result = import_fkd(
        source,
        options.pop("out"),
        num_classes=num_classes,
        files=_lines(files_list),
        classes=_lines(classes_list),
        input_size=input_size,
        **options,
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
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Log-probs kept per token [default: K of a topk:K store; required for a dense one].",
)
@click.option(
    "--rows-per-file",
    type=click.IntRange(min=1),
    default=256,
    help="Samples per data_{i}.parquet file.",
)
def export_distillkit_command(store: str, out: str, top_k: int | None, rows_per_file: int) -> None:
    """Write the token STORE as a DistillKit logit set in the new folder OUT."""
    from kdcache.store.bridges.distillkit import export_distillkit

    result = export_distillkit(store, out, top_k=top_k, rows_per_file=rows_per_file)
    click.echo(
        f"exported {store} into {result.out}: {counted(result.num_samples, 'sequence')} in "
        f"{counted(result.num_files, 'file')}, top-{result.k} log-probs per token"
    )
