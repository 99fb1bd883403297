"""The ``kdcache bench`` commands: side-by-side measurements (see docs/benchmarks.md).

:mod:`kdcache.cli.commands` adds the :func:`bench` group to the command line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import click

from kdcache.choices import AMP_DTYPES, INPUT_FORMS
from kdcache.cli.options import config_options
from kdcache.config import DEVICE_HELP, ENCODING_LIST, SpeedOptions
from kdcache.errors import ConfigError
from kdcache.options import Options, option


@click.group()
def bench() -> None:
    """Measure the logit feed, the dump and distillation from the cache, for images and (`lm`)
    language models (see docs/benchmarks.md)."""


@dataclass(frozen=True, kw_only=True)
class CommonBenchOptions(Options):
    """Options every benchmark takes."""

    threads: int | None = option(None, help="Torch intra-op threads [default: all cores].")
    json: bool = option(False, help="Print one JSON object instead of a summary.")

    def arguments(self) -> dict[str, Any]:
        """The benchmark function's keyword arguments: every field but the output format."""
        return {key: value for key, value in self.to_dict().items() if key != "json"}


@dataclass(frozen=True, kw_only=True)
class BenchOptions(CommonBenchOptions):
    """Options of the image benchmarks: a language-model spec (``hf:...``, ``text:...``) is
    refused, naming its option (``kdcache bench lm`` times language models)."""

    def __post_init__(self) -> None:
        from kdcache.lm.models import is_lm_model_spec
        from kdcache.lm.text import is_text_spec

        for name in ("teacher", "student", "dataset"):
            value = getattr(self, name, None)
            if is_lm_model_spec(value) or is_text_spec(value):
                default = next(f.default for f in dataclasses.fields(self) if f.name == name)
                raise ConfigError(
                    f"--{name} {value}: this bench command times image models and datasets "
                    f"only; pass an image spec such as {default}, or time a language model "
                    "with `kdcache bench lm`"
                )
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class RoundOptions(Options):
    """Options of the benchmarks that time interleaved rounds over a DataLoader."""

    num_workers: int = option(0, help="DataLoader worker processes.")
    device: str | None = option(None, help=DEVICE_HELP)
    repeats: int = option(3, help="Interleaved rounds; medians are reported.")


@dataclass(frozen=True, kw_only=True)
class BenchFeedOptions(BenchOptions):
    num_samples: int = option(1_000_000, help="Rows N of the benchmark store.")
    num_classes: int = option(1000, help="Classes C per row.")
    batch_size: int = option(256, help="Rows per random-order batch.")
    encoding: str = option("float16", help=f"Store encoding: {ENCODING_LIST}.")
    chunked_memory: str | None = option(
        None,
        help="Budget of the larger-than-RAM mode, e.g. 512MiB [default: a quarter of the store].",
    )
    max_batches: int | None = option(
        None, help="Stop each mode after this many batches [default: one epoch]."
    )
    path: str | None = option(
        None,
        help="Where to write the benchmark store, a folder or a URL such as s3://bucket/feed.zarr "
        "[default: a temporary folder, deleted after].",
    )
    decode_threads: int | None = option(
        None, help="Chunks the feed decodes (or fetches) at once [default: the feed's]."
    )


@dataclass(frozen=True, kw_only=True)
class BenchDumpOptions(SpeedOptions, RoundOptions, BenchOptions):
    teacher: str = option("resnet50", help="Teacher model spec (random weights).")
    dataset: str = option("fake:2048:32:1000", help="Dataset spec.")
    batch_size: int = option(256, help="Samples per forward pass.")
    encoding: str = option(
        "float16",
        help="Store encoding; with --writer-only a comma-separated list, e.g. float16,int8,topk:5.",
    )
    writer_workers: str | None = option(
        None,
        help="Writer threads of the dump [default: the dump's default]; with --writer-only a "
        "comma-separated list, e.g. 1,2,4.",
    )
    views: int = option(1, help="Augmented views per sample.")
    augment: str | None = option(
        None, help="Augmentation recipe of the views (see docs/augmentation.md)."
    )
    writer_only: bool = option(
        False,
        help="Time the store writer alone (no teacher): rows/s per encoding and writer threads, "
        "on teacher-like logits with the dataset's number of classes.",
    )
    rows: int = option(65_536, help="Rows each --writer-only run writes.")
    store_rows: int | None = option(
        None,
        help="With --writer-only: rows of the dump those rows belong to (e.g. 20480000 for "
        "1.28M images x 16 views), which sets how sparsely the fidelity is sampled [default: "
        "--rows, a store of its own].",
    )
    path: str | None = option(
        None,
        path="dir",
        help="Folder to dump into, on the disk whose fsync cost to measure [default: a temporary "
        "folder].",
    )


@dataclass(frozen=True, kw_only=True)
class BenchDistillOptions(SpeedOptions, RoundOptions, BenchOptions):
    student: str = option("resnet18", help="Student model spec.")
    teacher: str = option("resnet50", help="Teacher model spec (random weights).")
    dataset: str = option("fake:2048:32:100", help="Dataset spec.")
    batch_size: int = option(128, help="Samples per step.")
    cache_memory: str | None = option(
        None, help="Memory budget of the cached run's feed, e.g. 8GiB."
    )
    epochs: int = option(2, help="Epochs per run; the last one is timed.")


@dataclass(frozen=True, kw_only=True)
class BenchInputsOptions(RoundOptions, BenchOptions):
    dataset: str = option("synthetic:4096:224:1000", help="Dataset spec.")
    forms: str | None = option(
        None,
        help=f"Comma-separated input forms among {', '.join(INPUT_FORMS)} [default: all the "
        "dataset has].",
    )
    batch_size: int = option(256, help="Samples per batch.")
    channels_last: bool = option(False, help="Lay the images out channels-last on the device.")


@dataclass(frozen=True, kw_only=True)
class BenchLMOptions(CommonBenchOptions):
    teacher: str = option(help="Teacher language model, hf:PATH (random weights without any).")
    student: str = option(help="Student language model, hf:PATH.")
    dataset: str = option(help="Text the teacher and students run over, text:FILE[:MAX_LENGTH].")
    batch_size: int = option(16, help="Sequences per forward pass and per step.")
    encoding: str = option("topk:32", help="Encoding of the dumped store.")
    epochs: int = option(2, help="Epochs per distillation run; the last one is timed.")
    repeats: int = option(3, help="Interleaved rounds; medians are reported.")
    device: str | None = option(None, help=DEVICE_HELP)
    amp: str | None = option(
        None, choices=tuple(AMP_DTYPES), help="Autocast of every forward (bare, dump and runs)."
    )
    feed_batches: int = option(50, help="Random batches the token feed is timed over.")

    def __post_init__(self) -> None:
        from kdcache.lm.models import is_lm_model_spec
        from kdcache.lm.text import is_text_spec

        for name in ("teacher", "student"):
            value = getattr(self, name)
            if not is_lm_model_spec(value):
                raise ConfigError(
                    f"--{name} {value}: `kdcache bench lm` times language models; pass "
                    f"hf:PATH (a save_pretrained folder), or time an image model with "
                    "`kdcache bench distill`"
                )
        if not is_text_spec(self.dataset):
            raise ConfigError(
                f"--dataset {self.dataset}: `kdcache bench lm` runs over text; pass "
                "text:FILE[:MAX_LENGTH]"
            )
        super().__post_init__()


def print_bench(result: dict[str, Any], as_json: bool) -> None:
    click.echo(json.dumps(result) if as_json else "\n".join(summary_lines(result)))


def summary_lines(record: dict[str, Any], indent: str = "") -> list[str]:
    """A benchmark's result as aligned ``name: value`` lines, nested records indented."""
    named = [(_summary_name(key), key, value) for key, value in record.items()]
    width = max((len(name) for name, _, value in named if not _is_block(value)), default=0)
    lines = []
    for name, key, value in named:
        if isinstance(value, dict):
            lines += [f"{indent}{name}:", *summary_lines(value, indent + "  ")]
        elif _is_block(value):
            lines.append(f"{indent}{name}:")
            for item in value:
                item_lines = summary_lines(item, indent + "    ")
                lines += [f"{indent}  - {item_lines[0].lstrip()}", *item_lines[1:]]
        else:
            lines.append(f"{indent}{name + ':':<{width + 1}} {_summary_value(key, value)}")
    return lines


def _is_block(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def _summary_name(key: str) -> str:
    """``samples_per_cpu_s`` -> ``samples/cpu-s``; ``open_s`` -> ``open`` and ``table_bytes`` ->
    ``table``, whose values carry the unit."""
    if "_per_" in key:
        quantity, per = key.split("_per_", 1)
        return f"{quantity.replace('_', ' ')}/{per.replace('_', '-')}"
    for suffix in ("_bytes", "_s"):
        if key.endswith(suffix):
            return key.removesuffix(suffix).replace("_", " ")
    return key.replace("_", " ")


def _summary_value(key: str, value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_summary_value(key, item) for item in value) or "none"
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_bytes") and "_per_" not in key and isinstance(value, int | float):
        return _size(value)
    if isinstance(value, int | float):
        unit = " s" if key.endswith("_s") and "_per_" not in key else ""
        return _number(value) + unit
    return str(value)


def _number(value: float) -> str:
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


@bench.command("feed")
@config_options(BenchFeedOptions)
def bench_feed(**fields: Any) -> None:
    """Random-order batches/s, open time and peak RSS of the in-memory and larger-than-RAM feeds."""
    from kdcache.bench.feed import bench_feed as run
    from kdcache.store.read.feed import parse_size

    options = BenchFeedOptions(**fields)
    memory = options.chunked_memory
    arguments = options.arguments() | {
        "chunked_memory": None if memory is None else parse_size(memory)
    }
    print_bench(run(**arguments), options.json)


@bench.command("dump")
@config_options(BenchDumpOptions)
def bench_dump(**fields: Any) -> None:
    """Dump time against the bare teacher forward over the same loader (per view with --views),
    or with --writer-only the writer's rows/s against its number of threads."""
    from kdcache.options import parse_list

    options = BenchDumpOptions(**fields)
    encodings = parse_list(
        options.encoding, str, option="--encoding", example="float16,int8,topk:5"
    )
    workers = (
        parse_list(options.writer_workers, int, option="--writer-workers", example="1,2,4")
        if options.writer_workers
        else None
    )
    if options.writer_only:
        from kdcache.bench.writer import bench_writer
        from kdcache.data.datasets import build_dataset

        print_bench(
            bench_writer(
                encodings=encodings,
                workers=workers,
                num_rows=options.rows,
                num_classes=build_dataset(options.dataset).num_classes,
                batch_size=options.batch_size,
                repeats=options.repeats,
                path=options.path,
                views=options.views,
                store_rows=options.store_rows,
            ),
            options.json,
        )
        return
    if len(encodings) > 1 or (workers is not None and len(workers) > 1):
        given = (
            f"--encoding {options.encoding}"
            if len(encodings) > 1
            else f"--writer-workers {options.writer_workers}"
        )
        raise ConfigError(
            f"{given}: lists need --writer-only; a dump is timed with one encoding and one "
            "number of writer threads"
        )
    from kdcache.bench.dump import bench_dump as run

    arguments = {
        key: value
        for key, value in options.arguments().items()
        if key not in ("writer_only", "rows", "store_rows")
    }
    arguments |= {"encoding": encodings[0], "writer_workers": workers[0] if workers else None}
    print_bench(run(**arguments), options.json)


@bench.command("distill")
@config_options(BenchDistillOptions)
def bench_distill(**fields: Any) -> None:
    """Epoch time distilling from the cache vs CE-only training vs online KD."""
    from kdcache.bench.distill import bench_distill as run

    options = BenchDistillOptions(**fields)
    print_bench(run(**options.arguments()), options.json)


@bench.command("inputs")
@config_options(BenchInputsOptions)
def bench_inputs(**fields: Any) -> None:
    """Samples/s and bytes per batch of each input form, loader to float images on the device."""
    from kdcache.bench.inputs import bench_inputs as run

    options = BenchInputsOptions(**fields)
    forms = options.forms
    chosen = None if forms is None else tuple(f.strip() for f in forms.split(",") if f.strip())
    print_bench(run(**options.arguments() | {"forms": chosen}), options.json)


@bench.command("lm")
@config_options(BenchLMOptions)
def bench_lm(**fields: Any) -> None:
    """A language model's dump tokens/s against the bare teacher forward, the token feed, and
    distillation from the cache vs CE-only vs online (docs/benchmarks.md#language-models)."""
    from kdcache.bench.lm import bench_lm as run

    options = BenchLMOptions(**fields)
    print_bench(run(**options.arguments()), options.json)
