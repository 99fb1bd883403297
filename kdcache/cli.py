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
from kdcache.config import LOSS_NAMES, DistillConfig, DumpConfig, TrainConfig
from kdcache.errors import KdcacheError
from kdcache.logits.sequence_losses import DIVERGENCES

EXIT_USER_ERROR = 1
#: Token-level losses beyond the shared ``kd`` (see kdcache.logits.sequence_losses).
LM_LOSS_NAMES = tuple(name for name in DIVERGENCES if name not in LOSS_NAMES)


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


def loop_options(function: Any) -> Any:
    """Options every training command takes."""
    options = [
        click.option(
            "--out",
            required=True,
            type=click.Path(file_okay=False),
            help="Run folder for checkpoints, metrics and config.",
        ),
        click.option(
            "--epochs",
            default=10,
            show_default=True,
            type=int,
            help="Passes over the training split.",
        ),
        click.option(
            "--batch-size",
            default=64,
            show_default=True,
            type=int,
            help="Samples per optimisation step.",
        ),
        click.option(
            "--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate."
        ),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            type=int,
            help="Seed for initialisation and shuffling.",
        ),
        click.option(
            "--device",
            default=None,
            help="cpu, cuda or cuda:N [default: cuda when available, else cpu].",
        ),
        click.option(
            "--num-workers",
            default=0,
            show_default=True,
            type=int,
            help="DataLoader worker processes.",
        ),
        click.option("--overwrite", is_flag=True, help="Replace a finished run already in --out."),
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
    click.echo(
        f"best val_acc {result.best_val_acc:.2f}% (epoch {result.best_epoch}), final {result.final_val_acc:.2f}%, "
        f"{result.epochs} epochs in {result.wall_time_s:.1f}s -> {result.out}"
    )


@cli.command()
@click.option(
    "--model",
    required=True,
    help="Model spec: mlp, cnn, a torchvision model name, package.module:function, or hf:PATH "
    "(a causal language model, see docs/lm.md).",
)
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="Dataset spec: digits, fake:N, imagefolder:PATH, cifar10:ROOT, ..., or "
    "text:FILE[:MAX_LEN] "
    "for a language model.",
)
@click.option(
    "--split",
    default="train",
    show_default=True,
    type=click.Choice(["train", "test"]),
    help="Split to train on; the other one validates.",
)
@loop_options
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
@click.option("--teacher", required=True, help="Teacher model spec (see `kdcache train --help`).")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="Teacher state_dict or checkpoint from `kdcache train`.",
)
@click.option(
    "--dataset", default="digits", show_default=True, help="Dataset spec to run the teacher over."
)
@click.option(
    "--split",
    default="train",
    show_default=True,
    type=click.Choice(["train", "test"]),
    help="Dataset split.",
)
@click.option(
    "--out",
    default="teacher.zarr",
    show_default=True,
    help="Store to create: a path or an fsspec URL (s3://...).",
)
@click.option(
    "--encoding",
    default="float16",
    show_default=True,
    help="How logits are stored: float32, float16, int8 (per-row scale/offset) or topk:K "
    "(the K largest logits plus tail statistics; any --temperature at distill time); "
    "sampled:S (S draws per token, language models, T = 1).",
)
@click.option(
    "--batch-size",
    default=256,
    show_default=True,
    type=int,
    help="Samples per teacher forward pass.",
)
@click.option(
    "--num-workers", default=0, show_default=True, type=int, help="DataLoader worker processes."
)
@click.option(
    "--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available, else cpu]."
)
@click.option(
    "--chunk-rows",
    default=None,
    type=int,
    help="Rows per Zarr chunk [default: about 1 MiB per chunk].",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--resume", is_flag=True, help="Continue an interrupted dump at --out.")
def dump_teacher(**options: Any) -> None:
    """Run the teacher once over a dataset and store its raw logits in a Zarr store."""
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
    from kdcache.dump import dump_teacher as run

    result = run(DumpConfig(**options))
    size = (
        "remote"
        if result.bytes_on_disk is None
        else f"{result.bytes_on_disk:,} bytes on disk ({result.bytes_per_sample:,.1f} B/sample)"
    )
    fidelity = "" if result.fidelity is None else f", KL(T=1) {result.fidelity.kl_at(1.0):.3g}"
    click.echo(
        f"wrote {result.out}: N={result.num_samples} C={result.num_classes} {result.encoding}, "
        f"{result.rows_computed} rows computed, {size}{fidelity}, {result.wall_time_s:.1f}s"
    )


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Also draw the teacher's max-probability and entropy histograms (T=1, 4) and per-class accuracy to this .png (.pdf, .svg).",
)
def inspect(store: str, as_json: bool, plot: str | None) -> None:
    """Show what STORE holds: identity, size, teacher accuracy and entropy, recorded fidelity."""
    from kdcache.store.report import format_report, inspect_store

    report = inspect_store(store)
    click.echo(json.dumps(report.to_dict()) if as_json else format_report(report))
    if plot:
        from kdcache.plots import plot_store
        from kdcache.store.reader import open_store

        click.echo(f"figure -> {plot_store(open_store(store), plot)}", err=True)


@cli.command()
@click.option("--student", required=True, help="Student model spec (see `kdcache train --help`).")
@click.option(
    "--cache", help="Teacher logit store written by `kdcache dump-teacher`: a path, URL or .zip."
)
@click.option(
    "--teacher", help="Online baseline only: teacher spec run in the loop instead of --cache."
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="Online baseline only: the teacher's weights.",
)
@click.option(
    "--dataset",
    help="Dataset spec [default: the one recorded in the store]; checked against its fingerprint.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    help="Dataset split [default: the one recorded in the store].",
)
@click.option(
    "--loss",
    default="kd",
    show_default=True,
    type=click.Choice(LOSS_NAMES + LM_LOSS_NAMES),
    help="Distillation loss; reverse (KL(q||p)), skew and js are for language models.",
)
@click.option(
    "--temperature", default=4.0, show_default=True, type=float, help="Softmax temperature T (> 0)."
)
@click.option(
    "--alpha",
    default=0.7,
    show_default=True,
    type=float,
    help="Weight of the soft loss, in [0, 1].",
)
@click.option(
    "--gamma", default=2.0, show_default=True, type=float, help="Focal exponent (--loss focal)."
)
@click.option(
    "--top-k",
    default=5,
    show_default=True,
    type=int,
    help="Teacher classes kept (--loss attention).",
)
@click.option(
    "--cache-memory",
    help="RAM for decoded logits, e.g. 8GiB; a larger store streams chunk by chunk [default: half the available memory].",
)
@loop_options
def distill(**options: Any) -> None:
    """Distill a student from cached teacher logits (or, as a baseline, from a live teacher)."""
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
@click.option(
    "--cache", required=True, help="Teacher logit store written by `kdcache dump-teacher`."
)
@click.option("--student", required=True, help="Student model spec (see `kdcache train --help`).")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Sweep folder: one run folder per setting, results.csv, sweep.png.",
)
@click.option(
    "--temperatures",
    default="1,2,4,8,16",
    show_default=True,
    help="Comma-separated temperatures T (> 0).",
)
@click.option(
    "--alphas",
    default="0.7",
    show_default=True,
    help="Comma-separated soft-loss weights in [0, 1]; 1 = soft targets only.",
)
@click.option(
    "--losses",
    default="kd",
    show_default=True,
    help=f"Comma-separated losses among {', '.join(LOSS_NAMES)}.",
)
@click.option(
    "--seeds",
    default="0",
    show_default=True,
    help="Comma-separated seeds; results are mean ± std over them.",
)
@click.option("--dataset", help="Dataset spec [default: the one recorded in the store].")
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    help="Dataset split [default: the one recorded in the store].",
)
@click.option(
    "--gamma", default=2.0, show_default=True, type=float, help="Focal exponent (loss focal)."
)
@click.option(
    "--top-k", default=5, show_default=True, type=int, help="Teacher classes kept (loss attention)."
)
@click.option(
    "--epochs",
    default=10,
    show_default=True,
    type=int,
    help="Passes over the training split, per run.",
)
@click.option(
    "--batch-size", default=64, show_default=True, type=int, help="Samples per optimisation step."
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available, else cpu]."
)
@click.option(
    "--num-workers", default=0, show_default=True, type=int, help="DataLoader worker processes."
)
@click.option(
    "--cache-memory",
    help="Memory budget of the store's logit feed, e.g. 8GiB [default: half the available memory].",
)
def sweep(temperatures: str, alphas: str, losses: str, seeds: str, **options: Any) -> None:
    """Distill one student per loss x alpha x temperature x seed from one store (resumable)."""
    from kdcache.lm.dispatch import is_lm_run

    if is_lm_run(models=(options["student"],), dataset=options["dataset"], cache=options["cache"]):
        raise KdcacheError(
            "sweep does not handle language-model stores yet; run `kdcache distill --cache STORE "
            "--student hf:PATH` once per setting (docs/lm.md)"
        )
    from kdcache.train.sweep import SweepConfig, format_table, parse_list, run_sweep

    result = run_sweep(
        SweepConfig(
            temperatures=parse_list(
                temperatures, float, option="--temperatures", example="1,2,4,8,16"
            ),
            alphas=parse_list(alphas, float, option="--alphas", example="0.5,0.7,1"),
            losses=parse_list(losses, str, option="--losses", example="kd,focal"),
            seeds=parse_list(seeds, int, option="--seeds", example="0,1,2"),
            **options,
        )
    )
    click.echo(format_table(result.rows))
    click.echo(
        f"{result.runs_done} runs trained, {result.runs_skipped} kept from before -> {result.results_csv}, {result.figure}"
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
@bench_options
def bench_distill(**options: Any) -> None:
    """Epoch time distilling from the cache vs CE-only training vs online KD."""
    from kdcache.bench import bench_distill as run

    as_json = options.pop("as_json")
    print_bench(run(**options), as_json)


def main() -> None:
    cli(prog_name="kdcache")
