"""The ``kdcache`` command line: a thin layer over the public Python API.

Results go to stdout, progress and logs to stderr. Every user-facing error is one line on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kdcache._version import __version__
from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.errors import KdcacheError
from kdcache.options import parse_list
from kdcache.pixels import INPUT_CHOICES, INPUT_FORMS
from kdcache.runtime import AMP_DTYPES
from kdcache.train.sweep import SweepConfig

EXIT_USER_ERROR = 1
F = TypeVar("F", bound=Callable[..., Any])


class KdcacheGroup(click.Group):
    """Turns every :class:`KdcacheError` into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdcacheError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(EXIT_USER_ERROR)


@click.group(
    cls=KdcacheGroup,
    context_settings={"auto_envvar_prefix": "KDCACHE", "help_option_names": ["-h", "--help"]},
)
@click.version_option(version=__version__, prog_name="kdcache")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
def cli(quiet: bool) -> None:
    """Run the teacher once, cache its logits in Zarr, distill students from the cache."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )


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
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
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
    settings.update(default=default, show_default=default is not None)
    return click.option(name, **settings)


def _text_type(meta: Any) -> click.ParamType:
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if meta.get("path") == "file":
        return click.Path(dir_okay=False)
    if meta.get("path") == "dir":
        return click.Path(file_okay=False)
    return click.STRING


def speed_options(function: Any) -> Any:
    """How inputs reach the device and how the models compute (docs/benchmarks.md#gpu)."""
    options = [
        click.option(
            "--inputs",
            default="auto",
            show_default=True,
            type=click.Choice(INPUT_CHOICES),
            help="What crosses to the device: float32 images, uint8 images normalised there, or "
            "(imagefolder) JPEG files decoded there; auto = jpeg on CUDA for imagefolder, else "
            "uint8.",
        ),
        click.option(
            "--amp",
            type=click.Choice(list(AMP_DTYPES)),
            help="Autocast the forward passes to bf16 or fp16 (losses stay float32) "
            "[default: off].",
        ),
        click.option(
            "--channels-last",
            is_flag=True,
            help="Channels-last memory format for models and images.",
        ),
        click.option(
            "--compile", is_flag=True, help="torch.compile the models (slow start, faster steps)."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def print_lm_run(result: Any) -> None:
    click.echo(
        f"best val_ppl {result.best_val_ppl:.3f} (epoch {result.best_epoch}), final "
        f"{result.final_val_ppl:.3f}, {result.epochs} epochs in {result.wall_time_s:.1f}s "
        f"-> {result.out}"
    )


def print_run(result: Any) -> None:
    from kdcache.distributed import rank_info

    if not rank_info().is_main:
        return  # under torchrun rank 0 reports for the whole job
    click.echo(
        f"best val_acc {result.best_val_acc:.2f}% (epoch {result.best_epoch}), final "
        f"{result.final_val_acc:.2f}%, "
        f"{result.epochs} epochs in {result.wall_time_s:.1f}s -> {result.out}"
    )


@cli.command()
@config_options(TrainConfig)
def train(**options: Any) -> None:
    """Train a model with plain cross-entropy (a teacher, or the CE-only baseline)."""
    from kdcache.lm.dispatch import is_lm_run

    if is_lm_run(models=(options["model"],), dataset=options["dataset"]):
        from kdcache.lm.loop import train_lm

        print_lm_run(train_lm(TrainConfig(**options)))
        return
    from kdcache.train.loop import train as run

    print_run(run(TrainConfig(**options)))


@cli.command("dump-teacher")
@config_options(DumpConfig)
def dump_teacher(**options: Any) -> None:
    """Run the teacher once over a dataset and store its raw logits in a Zarr store.

    Prefix with `torchrun --nproc-per-node K` to split the dump by whole chunks between K
    processes writing one store (see docs/distributed.md).
    """
    from kdcache.lm.dispatch import is_lm_run

    if is_lm_run(models=(options["teacher"],), dataset=options["dataset"]):
        from kdcache.lm.dump import dump_lm

        lm = dump_lm(DumpConfig(**options))
        size = "remote" if lm.bytes_per_token is None else f"{lm.bytes_per_token:,.1f} B/token"
        click.echo(
            f"wrote {lm.out}: {lm.num_samples} sequences, {lm.num_tokens} tokens, "
            f"V={lm.num_classes} {lm.encoding}, {lm.rows_computed} tokens computed "
            f"({lm.tokens_per_s:,.0f} tokens/s), "
            f"{size}, {lm.wall_time_s:.1f}s"
        )
        return
    from kdcache.distributed import rank_info
    from kdcache.dump import dump_teacher as run

    result = run(DumpConfig(**options))
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
        f"{result.encoding}, {result.rows_computed} rows computed, {size}{fidelity}, "
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
    from kdcache.store.report import format_report, inspect_store

    report = inspect_store(store)
    click.echo(json.dumps(report.to_dict()) if as_json else format_report(report))
    if plot:
        from kdcache.plots import plot_store
        from kdcache.store.reader import open_store

        reader = open_store(store)
        click.echo(f"figure -> {plot_store(reader, plot)}", err=True)
        if reader.metadata.augment is not None:
            from pathlib import Path

            from kdcache.augment.figure import plot_views
            from kdcache.datasets import build_dataset

            recorded = reader.metadata.dataset or {}
            target = Path(plot)
            views_path = target.with_name(f"{target.stem}-views{target.suffix}")
            try:
                dataset = build_dataset(recorded["spec"], split=recorded.get("split", "train"))
            except (KeyError, KdcacheError) as error:
                click.echo(f"views figure skipped: cannot rebuild the dataset ({error})", err=True)
            else:
                click.echo(f"figure -> {plot_views(reader, dataset, views_path)}", err=True)


@cli.command()
@config_options(DistillConfig)
def distill(**options: Any) -> None:
    """Distill a student from cached teacher logits (or, as a baseline, from a live teacher).

    Prefix with `torchrun --nproc-per-node K` to train with DistributedDataParallel on K
    processes; --batch-size is then per process (see docs/distributed.md).
    """
    from kdcache.lm.dispatch import is_lm_run

    specs = (options["student"], options["teacher"])
    if is_lm_run(models=specs, dataset=options["dataset"], cache=options["cache"]):
        from kdcache.lm.config import LMDistillConfig
        from kdcache.lm.loop import distill_lm

        print_lm_run(distill_lm(LMDistillConfig.from_options(options)))
        return
    from kdcache.train.loop import distill as run

    print_run(run(DistillConfig(**options)))


@cli.command()
@config_options(SweepConfig)
def sweep(**options: Any) -> None:
    """Distill one student per loss x alpha x temperature x seed from one store (resumable)."""
    from kdcache.lm.dispatch import is_lm_run

    if is_lm_run(models=(options["student"],), dataset=options["dataset"], cache=options["cache"]):
        raise KdcacheError(
            "sweep does not handle language-model stores yet; run `kdcache distill --cache STORE "
            "--student hf:PATH` once per setting (docs/lm.md)"
        )
    from kdcache.train.sweep import format_table, run_sweep

    result = run_sweep(SweepConfig(**options))
    click.echo(format_table(result.rows))
    click.echo(
        f"{result.runs_done} runs trained, {result.runs_skipped} kept from before -> "
        f"{result.results_csv}, {result.figure}"
    )


@cli.command()
@click.argument("store")
def verify(store: str) -> None:
    """Check every chunk and the metadata of STORE; exit 1 if anything is wrong.

    STORE is a path, URL or .zip. Corrupted or missing chunks and NaN/Inf rows are reported as
    sample-index ranges, with any metadata/array mismatch and how far an unfinished dump got.
    """
    from kdcache.store.verify import verify_store

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
    from kdcache.store.pack import pack_store

    result = pack_store(store, out, overwrite=overwrite)
    click.echo(
        f"packed {store} into {result.out}: {result.num_objects} objects, {result.nbytes:,} bytes"
    )


@cli.group()
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
    from kdcache.bench import bench_feed as run
    from kdcache.store.feed import parse_size

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
    "--num-workers", default=0, show_default=True, type=int, help="DataLoader worker processes."
)
@click.option(
    "--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available, else cpu]."
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=int,
    help="Interleaved rounds; medians are reported.",
)
@speed_options
@click.option(
    "--path",
    type=click.Path(file_okay=False),
    help="Folder to dump into, on the disk whose fsync cost to measure [default: a temporary "
    "folder].",
)
@bench_options
def bench_dump(**options: Any) -> None:
    """Dump time against the bare teacher forward over the same loader."""
    from kdcache.bench import bench_dump as run

    as_json = options.pop("as_json")
    print_bench(run(**options), as_json)


@bench.command("distill")
@click.option("--student", default="resnet18", show_default=True, help="Student model spec.")
@click.option(
    "--teacher", default="resnet50", show_default=True, help="Teacher model spec (random weights)."
)
@click.option("--dataset", default="fake:2048:32:100", show_default=True, help="Dataset spec.")
@click.option("--batch-size", default=128, show_default=True, type=int, help="Samples per step.")
@click.option(
    "--num-workers", default=0, show_default=True, type=int, help="DataLoader worker processes."
)
@click.option(
    "--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available, else cpu]."
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=int,
    help="Interleaved rounds; medians are reported.",
)
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
    from kdcache.bench import bench_distill as run

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
@click.option(
    "--num-workers", default=0, show_default=True, type=int, help="DataLoader worker processes."
)
@click.option(
    "--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available, else cpu]."
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=int,
    help="Interleaved rounds; medians are reported.",
)
@click.option(
    "--channels-last", is_flag=True, help="Lay the images out channels-last on the device."
)
@bench_options
def bench_inputs(forms: str | None, **options: Any) -> None:
    """Samples/s and bytes per batch of each input form, loader to float images on the device."""
    from kdcache.bench_inputs import bench_inputs as run

    as_json = options.pop("as_json")
    chosen = None if forms is None else tuple(f.strip() for f in forms.split(",") if f.strip())
    print_bench(run(forms=chosen, **options), as_json)


def main() -> None:
    cli(prog_name="kdcache")
