"""The ``kdcache bench`` commands: side-by-side measurements (see docs/benchmarks.md).

:mod:`kdcache.cli.commands` adds the :func:`bench` group to the command line.
"""

from __future__ import annotations

import json
from typing import Any

import click

from kdcache.choices import INPUT_FORMS
from kdcache.cli.options import speed_options
from kdcache.config import DEVICE_HELP


@click.group()
def bench() -> None:
    """Measure the logit feed, the dump and distillation from the cache (see docs/benchmarks.md)."""


def bench_options(function: Any) -> Any:
    """Options every benchmark takes."""
    options = [
        click.option("--threads", type=int, help="Torch intra-op threads [default: all cores]."),
        click.option(
            "--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def round_options(function: Any) -> Any:
    """Options of the benchmarks that time interleaved rounds over a DataLoader."""
    options = [
        click.option(
            "--num-workers",
            default=0,
            show_default=True,
            type=int,
            help="DataLoader worker processes.",
        ),
        click.option("--device", default=None, help=DEVICE_HELP),
        click.option(
            "--repeats",
            default=3,
            show_default=True,
            type=int,
            help="Interleaved rounds; medians are reported.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def print_bench(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key}: {json.dumps(value)}")


@bench.command("feed")
@click.option(
    "--num-samples",
    default=1_000_000,
    show_default=True,
    type=int,
    help="Rows N of the benchmark store.",
)
@click.option("--num-classes", default=1000, show_default=True, type=int, help="Classes C per row.")
@click.option(
    "--batch-size", default=256, show_default=True, type=int, help="Rows per random-order batch."
)
@click.option("--encoding", default="float16", show_default=True, help="Store encoding.")
@click.option(
    "--chunked-memory",
    help="Budget of the larger-than-RAM mode, e.g. 512MiB [default: a quarter of the store].",
)
@click.option(
    "--max-batches", type=int, help="Stop each mode after this many batches [default: one epoch]."
)
@click.option(
    "--path",
    help="Where to write the benchmark store [default: a temporary folder, deleted after].",
)
@bench_options
def bench_feed(chunked_memory: str | None, **options: Any) -> None:
    """Random-order batches/s, open time and peak RSS of the in-memory and larger-than-RAM feeds."""
    from kdcache.bench.feed import bench_feed as run
    from kdcache.store.read.feed import parse_size

    as_json = options.pop("as_json")
    print_bench(
        run(
            chunked_memory=None if chunked_memory is None else parse_size(chunked_memory), **options
        ),
        as_json,
    )


@bench.command("dump")
@click.option(
    "--teacher", default="resnet50", show_default=True, help="Teacher model spec (random weights)."
)
@click.option("--dataset", default="fake:2048:32:1000", show_default=True, help="Dataset spec.")
@click.option(
    "--batch-size", default=256, show_default=True, type=int, help="Samples per forward pass."
)
@click.option(
    "--encoding",
    default="float16",
    show_default=True,
    help="Store encoding; with --writer-only a comma-separated list, e.g. float16,int8,topk:5.",
)
@click.option(
    "--writer-workers",
    help="Writer threads of the dump [default: the dump's default]; with --writer-only a "
    "comma-separated list, e.g. 1,2,4.",
)
@click.option("--views", default=1, show_default=True, type=int, help="Augmented views per sample.")
@click.option("--augment", help="Augmentation recipe of the views (see docs/augmentation.md).")
@click.option(
    "--writer-only",
    is_flag=True,
    help="Time the store writer alone (no teacher): rows/s per encoding and writer threads, "
    "on teacher-like logits with the dataset's number of classes.",
)
@click.option(
    "--rows",
    default=65_536,
    show_default=True,
    type=int,
    help="Rows each --writer-only run writes.",
)
@round_options
@speed_options
@click.option(
    "--path",
    type=click.Path(file_okay=False),
    help="Folder to dump into, on the disk whose fsync cost to measure [default: a temporary "
    "folder].",
)
@bench_options
def bench_dump(
    encoding: str, writer_workers: str | None, writer_only: bool, rows: int, **options: Any
) -> None:
    """Dump time against the bare teacher forward over the same loader (per view with --views),
    or with --writer-only the writer's rows/s against its number of threads."""
    from kdcache.errors import ConfigError
    from kdcache.options import parse_list

    as_json = options.pop("as_json")
    encodings = parse_list(encoding, str, option="--encoding", example="float16,int8,topk:5")
    workers = (
        parse_list(writer_workers, int, option="--writer-workers", example="1,2,4")
        if writer_workers
        else None
    )
    if writer_only:
        from kdcache.bench.writer import bench_writer
        from kdcache.data.datasets import build_dataset

        print_bench(
            bench_writer(
                encodings=encodings,
                workers=workers,
                num_rows=rows,
                num_classes=build_dataset(options["dataset"]).num_classes,
                batch_size=options["batch_size"],
                repeats=options["repeats"],
                path=options["path"],
            ),
            as_json,
        )
        return
    if len(encodings) > 1 or (workers is not None and len(workers) > 1):
        given = (
            f"--encoding {encoding}" if len(encodings) > 1 else f"--writer-workers {writer_workers}"
        )
        raise ConfigError(
            f"{given}: lists need --writer-only; a dump is timed with one encoding and one "
            "number of writer threads"
        )
    from kdcache.bench.dump import bench_dump as run

    writer_threads = workers[0] if workers else None
    print_bench(run(encoding=encodings[0], writer_workers=writer_threads, **options), as_json)


@bench.command("distill")
@click.option("--student", default="resnet18", show_default=True, help="Student model spec.")
@click.option(
    "--teacher", default="resnet50", show_default=True, help="Teacher model spec (random weights)."
)
@click.option("--dataset", default="fake:2048:32:100", show_default=True, help="Dataset spec.")
@click.option("--batch-size", default=128, show_default=True, type=int, help="Samples per step.")
@round_options
@click.option("--cache-memory", help="Memory budget of the cached run's feed, e.g. 8GiB.")
@click.option(
    "--epochs",
    default=2,
    show_default=True,
    type=int,
    help="Epochs per run; the last one is timed.",
)
@speed_options
@bench_options
def bench_distill(**options: Any) -> None:
    """Epoch time distilling from the cache vs CE-only training vs online KD."""
    from kdcache.bench.distill import bench_distill as run

    as_json = options.pop("as_json")
    print_bench(run(**options), as_json)


@bench.command("inputs")
@click.option(
    "--dataset", default="synthetic:4096:224:1000", show_default=True, help="Dataset spec."
)
@click.option(
    "--forms",
    default=None,
    help=f"Comma-separated input forms among {', '.join(INPUT_FORMS)} [default: all the "
    "dataset has].",
)
@click.option("--batch-size", default=256, show_default=True, type=int, help="Samples per batch.")
@round_options
@click.option(
    "--channels-last", is_flag=True, help="Lay the images out channels-last on the device."
)
@bench_options
def bench_inputs(forms: str | None, **options: Any) -> None:
    """Samples/s and bytes per batch of each input form, loader to float images on the device."""
    from kdcache.bench.inputs import bench_inputs as run

    as_json = options.pop("as_json")
    chosen = None if forms is None else tuple(f.strip() for f in forms.split(",") if f.strip())
    print_bench(run(forms=chosen, **options), as_json)
