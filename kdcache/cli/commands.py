"""The ``kdcache`` command line: a thin layer over the public Python API.

Results go to stdout, progress and logs to stderr. Every user-facing error is one line on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from kdcache._version import __version__
from kdcache.cli.bench import bench
from kdcache.cli.bridges import concat, export_group, import_group
from kdcache.cli.options import config_options
from kdcache.config import DistillConfig, DumpConfig, SweepConfig, TrainConfig
from kdcache.errors import KdcacheError
from kdcache.progress import announce
from kdcache.store_config import ConvertConfig, MergeConfig
from kdcache.wording import counted

__all__ = ["EXIT_USER_ERROR", "cli", "main"]

EXIT_USER_ERROR = 1
#: The shell's status for a command stopped by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


class KdcacheGroup(click.Group):
    """Turns every :class:`KdcacheError` into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdcacheError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(EXIT_USER_ERROR)


class CliLogFormatter(logging.Formatter):
    """Plain messages; a warning starts with ``Warning:`` as an error starts with ``Error:``."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"Warning: {message}" if record.levelno == logging.WARNING else message


@click.group(
    cls=KdcacheGroup,
    context_settings={"auto_envvar_prefix": "KDCACHE", "help_option_names": ["-h", "--help"]},
)
@click.version_option(version=__version__, prog_name="kdcache")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
def cli(quiet: bool) -> None:
    """Run the teacher once, cache its logits in Zarr, distill students from the cache."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CliLogFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])


def print_run(result: Any) -> None:
    from kdcache.distributed import rank_info

    if rank_info().is_main:  # under torchrun rank 0 reports for the whole job
        click.echo(result.summary())


@cli.command()
@config_options(TrainConfig)
def train(**options: Any) -> None:
    """Train a model with plain cross-entropy (a teacher, or the CE-only baseline)."""
    config = TrainConfig(**options)  # refused options fail before the heavy imports
    announce("train: starting (loading the dataset and building the model)")
    from kdcache.train.loop import train as run

    print_run(run(config))


@cli.command("dump-teacher")
@config_options(DumpConfig)
def dump_teacher(**options: Any) -> None:
    """Run the teacher once over a dataset and store its raw logits in a Zarr store.

    Prefix with `torchrun --nproc-per-node K` to split the dump by whole chunks between K
    processes writing one store (see docs/distributed.md).
    """
    config = DumpConfig(**options)  # refused options fail before the heavy imports
    announce("dump-teacher: starting (loading the dataset and the teacher)")
    try:
        _dump(config)
    except KeyboardInterrupt:
        click.echo(
            f"Interrupted: {options['out']} keeps the chunks written so far; run the same command "
            "with --resume to continue the dump",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)


def _dump(config: DumpConfig) -> None:
    from kdcache.distributed import rank_info
    from kdcache.lm.dispatch import is_lm_run

    if is_lm_run(models=(config.teacher,), dataset=config.dataset):
        from kdcache.lm.dump import dump_lm

        lm = dump_lm(config)
        if not rank_info().is_main:
            return  # under torchrun rank 0 reports for the whole job
        size = "remote" if lm.bytes_per_token is None else f"{lm.bytes_per_token:,.1f} B/token"
        click.echo(
            f"wrote {lm.out}: {counted(lm.num_samples, 'sequence')}, "
            f"{counted(lm.num_tokens, 'token')}, V={lm.num_classes} {lm.encoding}, "
            f"{counted(lm.rows_computed, 'token')} computed "
            f"({lm.tokens_per_s:,.0f} tokens/s), "
            f"{size}, {lm.wall_time_s:.1f}s"
        )
        return
    from kdcache.dump.teacher import dump_teacher as run

    result = run(config)
    if not rank_info().is_main:
        return  # under torchrun rank 0 reports for the whole job
    size = (
        "remote"
        if result.bytes_on_disk is None
        else f"{result.bytes_on_disk:,} bytes on disk ({result.bytes_per_sample:,.1f} B/sample)"
    )
    fidelity = "" if result.fidelity is None else f", KL(T=1) {result.fidelity.kl_at(1.0):.3g}"
    views = f" V={result.views}" if result.views > 1 else ""
    if result.views > 1 and result.bytes_per_view is not None:
        size += f", {result.bytes_per_view:,.1f} B/view"
    click.echo(
        f"wrote {result.out}: N={result.num_samples}{views} C={result.num_classes} "
        f"{result.encoding}, {counted(result.rows_computed, 'row')} computed, {size}{fidelity}, "
        f"{result.wall_time_s:.1f}s"
    )


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Also draw the teacher's max-probability and entropy histograms (T=1, 4) and "
    "per-class accuracy to this .png (.pdf, .svg); for a store with views, a few samples' views "
    "with the teacher's top classes to NAME-views.png beside it.",
)
def inspect(store: str, as_json: bool, plot: str | None) -> None:
    """Show what STORE holds: identity, size, teacher accuracy and entropy, recorded fidelity."""
    from kdcache.store.tools.report import format_report, inspect_store

    report = inspect_store(store)
    click.echo(json.dumps(report.to_dict()) if as_json else format_report(report))
    if plot:
        from kdcache.plots.figures import plot_store
        from kdcache.store.read.reader import open_store

        reader = open_store(store)
        click.echo(f"figure -> {plot_store(reader, plot)}", err=True)
        if reader.metadata.augment is not None:
            from pathlib import Path

            from kdcache.data.datasets import build_dataset
            from kdcache.plots.views import plot_views

            recorded = reader.metadata.dataset or {}
            target = Path(plot)
            views_path = target.with_name(f"{target.stem}-views{target.suffix}")
            try:
                dataset = build_dataset(recorded["spec"], split=recorded.get("split", "train"))
            except (KeyError, KdcacheError) as error:
                click.echo(
                    f"Warning: views figure skipped: cannot rebuild the dataset ({error})", err=True
                )
            else:
                click.echo(f"figure -> {plot_views(reader, dataset, views_path)}", err=True)


@cli.command()
@config_options(DistillConfig)
def distill(**options: Any) -> None:
    """Distill a student from cached teacher logits (or, as a baseline, from a live teacher).

    Prefix with `torchrun --nproc-per-node K` to train with DistributedDataParallel on K
    processes; --batch-size is then per process (see docs/distributed.md).
    """
    config = DistillConfig(**options)  # refused options fail before the heavy imports
    announce("distill: starting (opening the store, loading the dataset, building the models)")
    from kdcache.train.loop import distill as run

    print_run(run(config))


@cli.command()
@config_options(SweepConfig)
def sweep(**options: Any) -> None:
    """Distill one student per loss x alpha x temperature x seed from one store, or several
    teachers combined in the loss (resumable)."""
    config = SweepConfig(**options)  # refused options fail before the heavy imports
    announce("sweep: starting (opening the store and loading the dataset)")
    from kdcache.train.sweep import format_table, run_sweep

    result = run_sweep(config)
    click.echo(format_table(result.rows))
    click.echo(
        f"{counted(result.runs_done, 'run')} trained, {result.runs_skipped} kept from before -> "
        f"{result.results_csv}, {result.figure}"
    )


@cli.command()
@click.argument("store")
def verify(store: str) -> None:
    """Check every chunk and the metadata of STORE; exit 1 if anything is wrong.

    STORE is a path, URL or .zip. Corrupted or missing chunks and NaN/Inf rows are reported as
    sample-index ranges, with any metadata/array mismatch and how far an unfinished dump got.
    """
    from kdcache.store.tools.verify import verify_store

    report = verify_store(store)
    for line in report.lines():
        click.echo(line)
    report.raise_if_bad()


@cli.command()
@click.argument("store")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def pack(store: str, out: str, overwrite: bool) -> None:
    """Pack a complete STORE (path or URL) into one zip file OUT.

    distill, verify and the Python API read the zip in place; it is written under a temporary name
    and renamed only once complete.
    """
    from kdcache.store.tools.pack import pack_store

    result = pack_store(store, out, overwrite=overwrite)
    click.echo(
        f"packed {store} into {result.out}: {counted(result.num_objects, 'object')}, "
        f"{result.nbytes:,} bytes"
    )


@cli.command()
@click.argument("source")
@click.argument("out")
@config_options(ConvertConfig)
def convert(source: str, out: str, **options: Any) -> None:
    """Write the complete store SOURCE anew as OUT in another --encoding, or only some samples.

    SOURCE is read one chunk at a time; the new encoding's fidelity to the source's rows is
    measured and recorded in OUT, which keeps the source's records and names where it came from.
    """
    config = ConvertConfig(**options)  # refused options fail before the heavy imports
    from kdcache.store.tools.convert import convert_store
    from kdcache.train.transfer import read_indices

    result = convert_store(
        source,
        out,
        encoding=config.encoding,
        indices=None if config.indices is None else read_indices(config.indices),
        overwrite=config.overwrite,
        chunk_rows=config.chunk_rows,
        fsync=config.fsync,
    )
    size = "remote" if result.nbytes is None else f"{result.nbytes:,} bytes on disk"
    fidelity = "" if result.fidelity is None else f", KL(T=1) {result.fidelity.kl_at(1.0):.3g}"
    views = f" V={result.views}" if result.views > 1 else ""
    click.echo(
        f"converted {source} ({result.source_encoding}) into {result.out}: "
        f"N={result.num_samples}{views} {result.encoding}, {size}{fidelity}"
    )


@cli.command()
@click.argument("stores", nargs=-1, required=True)
@config_options(MergeConfig)
def merge(stores: tuple[str, ...], **options: Any) -> None:
    """Write one store of the ensemble of the teachers in STORES (two or more) as --out.

    The stores must hold one dataset's rows (same samples, labels and views); they are read one
    chunk at a time and the ensemble's logits written: the mean of the logits, or the mixture of
    the softmaxes at --temperature. The new store records its sources.
    """
    config = MergeConfig(**options)  # refused options fail before the heavy imports
    from kdcache.store.tools.merge import merge_stores

    result = merge_stores(
        stores,
        config.out,
        mode=config.mode,
        temperature=config.temperature,
        weights=config.weights,
        encoding=config.encoding,
        top_k=config.top_k,
        bits=config.bits,
        overwrite=config.overwrite,
        chunk_rows=config.chunk_rows,
        fsync=config.fsync,
    )
    size = "remote" if result.nbytes is None else f"{result.nbytes:,} bytes on disk"
    at = result.temperature if result.mode == "mixture" else 1.0
    fidelity = (
        f", KL(T={at:g}) {result.fidelity.kl_at(at):.3g}"
        if result.fidelity is not None and at in result.fidelity.temperatures
        else ""
    )
    mode = result.mode + (f" at T={result.temperature:g}" if result.mode == "mixture" else "")
    views = f" V={result.views}" if result.views > 1 else ""
    click.echo(
        f"merged {counted(len(result.sources), 'store')} ({mode}, weights "
        f"{','.join(f'{weight:.3g}' for weight in result.weights)}) into {result.out}: "
        f"N={result.num_samples}{views} {result.encoding}, {size}{fidelity}"
    )


cli.add_command(bench)
cli.add_command(concat)
cli.add_command(import_group)
cli.add_command(export_group)


def main() -> None:
    cli(prog_name="kdcache")
