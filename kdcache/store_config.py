"""The typed configurations of the commands that write or export a store outside a dump:
``convert``, ``merge``, ``concat``, ``import FORMAT`` and ``export distillkit``.

Each field is declared once with :func:`~kdcache.options.option` (its default, help and checks);
the command line builds its options from these dataclasses and calls the matching function of
:mod:`kdcache.store`. Options every new store takes live in :class:`NewStoreOptions`, those every
import takes in :class:`ImportOptions`. Like :mod:`kdcache.config`, this imports neither click
nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.choices import ENSEMBLE_MODES
from kdcache.config import ENCODING_LIST, FSYNC_HELP
from kdcache.logits.loss_options import TEMPERATURE
from kdcache.options import Bounds, Options, option, require

__all__ = [
    "ConcatConfig",
    "ConvertConfig",
    "ExportDistillkitConfig",
    "ImportDistillkitConfig",
    "ImportFkdConfig",
    "ImportMegatronConfig",
    "ImportOptions",
    "ImportTinyvitConfig",
    "MergeConfig",
    "NewStoreOptions",
]

#: A count of rows, samples, classes or tokens.
_COUNT = Bounds(1, 2**40)
#: A number of classes (a vocabulary included): a softmax over fewer than two says nothing.
_CLASSES = Bounds(2, 2**31 - 1)


@dataclass(frozen=True, kw_only=True)
class NewStoreOptions(Options):
    """How any of these commands writes its new store."""

    chunk_rows: int | None = option(
        None,
        bounds=_COUNT,
        help="Rows per Zarr chunk of the new store [default: about 1 MiB per chunk].",
    )
    overwrite: bool = option(
        False, help="Replace an existing store at OUT (only once the new one verifies)."
    )
    fsync: bool = option(True, help=FSYNC_HELP)


@dataclass(frozen=True, kw_only=True)
class ConvertConfig(NewStoreOptions):
    """How ``kdcache convert`` writes a store anew (kdcache.store.tools.convert.convert_store)."""

    encoding: str = option(
        help=f"The new store's encoding: {ENCODING_LIST} (see docs/encodings.md); its fidelity "
        "to the source rows is measured and recorded.",
    )
    indices: str | None = option(
        None,
        path="file",
        help="Copy only these sample indices, kept in ascending order (a .npy file, or a text file "
        "of integers separated by spaces, commas or newlines) [default: every sample].",
    )

    def __post_init__(self) -> None:
        from kdcache.logits.encodings import parse_encoding

        parse_encoding(self.encoding)  # a bad name fails here, listing the valid encodings
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class MergeConfig(NewStoreOptions):
    """How ``kdcache merge`` writes an ensemble of stores
    (kdcache.store.tools.merge.merge_stores)."""

    out: str = option(help="The merged store to write: a path or URL (never one of the sources).")
    mode: str = option(
        "mean",
        choices=ENSEMBLE_MODES,
        help="mean: the weighted mean of the logits (good at any temperature); mixture: the "
        "weighted mixture of the softmaxes at --temperature, stored as T*log(mixture) (distill "
        "it at that T).",
    )
    temperature: float = option(
        1.0,
        help="The mixture's temperature T; also the T sparse (topk:K) sources' tails are filled "
        "for.",
    )
    weights: tuple[float, ...] = option(
        (),
        example="0.5,0.25,0.25",
        help="One weight >= 0 per store, in their order, normalised to sum to 1 [default: equal].",
    )
    encoding: str | None = option(
        None,
        help="The merged store's encoding [default: the most precise of dense sources' "
        "encodings; topk:K when a source is sparse].",
    )
    top_k: int | None = option(
        None,
        bounds=_COUNT,
        help="Classes kept per row from the union of sparse sources' classes (the encoding "
        "topk:K) [default: the sum of their K, which holds the whole union].",
    )
    bits: int | None = option(
        None,
        help="Store the kept values of the topk:K output in BITS-bit codes (the encoding "
        "topk:K:BITS: a fifth to a third fewer bytes, error bounded) [default: float16 values].",
    )

    def __post_init__(self) -> None:
        from kdcache.logits.encodings import parse_encoding

        require(
            self.mode in ENSEMBLE_MODES,
            f"unknown --mode {self.mode!r}; valid choices: {', '.join(ENSEMBLE_MODES)}",
        )
        TEMPERATURE.check(self.temperature)
        if self.bits is not None:
            from kdcache.logits.viewset import MAX_BITS, MIN_BITS

            require(
                MIN_BITS <= self.bits <= MAX_BITS,
                f"--bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}; e.g. --bits 8",
            )
        if self.encoding is not None:
            parse_encoding(self.encoding)  # a bad name fails here, listing the valid encodings
        object.__setattr__(self, "weights", tuple(float(weight) for weight in self.weights))
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class ConcatConfig(NewStoreOptions):
    """How ``kdcache concat`` joins parts of one dataset (kdcache.store.tools.concat)."""

    out: str = option(help="The joined store (a path or URL).")
    link: bool = option(
        False,
        help="Copy nothing: OUT is a small joined store that reads SOURCES in place, by path or "
        "URL and digest (image stores).",
    )

    def __post_init__(self) -> None:
        if self.link:
            require(
                self.chunk_rows is None,
                "--chunk-rows sizes copied rows; --link copies none: drop it",
            )
            require(self.fsync, "--no-fsync speeds up copied rows; --link copies none: drop it")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class ImportOptions(NewStoreOptions):
    """What every ``kdcache import FORMAT`` takes (kdcache.store.bridges)."""

    out: str = option(help="The new store (a path or URL).")
    encoding: str | None = option(
        None,
        help="The new store's encoding [default: topk:K, which keeps the K stored log-probs "
        "exactly].",
    )
    teacher: str | None = option(None, help="The teacher's name, recorded in OUT.")

    def __post_init__(self) -> None:
        if self.encoding is not None:
            from kdcache.logits.encodings import parse_encoding

            parse_encoding(self.encoding)  # a bad name fails here, listing the valid encodings
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class ImportDistillkitConfig(ImportOptions):
    """``kdcache import distillkit`` (kdcache.store.bridges.distillkit.import_distillkit)."""

    config: str | None = option(
        None,
        path="file",
        help="DistillKit's compression_config.yaml [default: the one beside the files].",
    )
    vocab_size: int | None = option(
        None, bounds=_CLASSES, help="The teacher's vocabulary [default: the config's d]."
    )


@dataclass(frozen=True, kw_only=True)
class ImportMegatronConfig(ImportOptions):
    """``kdcache import megatron`` (kdcache.store.bridges.megatron.import_megatron)."""

    tokens: str = option(
        path="file",
        help="A .npy (N, S + 1) array: the token ids of the samples the shards hold, in training "
        "order (Megatron's shards hold none).",
    )
    vocab_size: int | None = option(
        None,
        bounds=_CLASSES,
        help="Required: the teacher's vocabulary (its padded output width).",
    )


@dataclass(frozen=True, kw_only=True)
class ImportTinyvitConfig(ImportOptions):
    """``kdcache import tinyvit`` (kdcache.store.bridges.tinyvit.import_tinyvit)."""

    num_classes: int | None = option(
        None,
        bounds=_CLASSES,
        help="Required: the teacher's classes (1000, or 21841 for ImageNet-22k).",
    )
    top_k: int | None = option(
        None,
        bounds=_COUNT,
        help="k of the records [default: from the folder name logits_top{k}_epoch{e}].",
    )
    keys: str | None = option(
        None,
        path="file",
        help="The dataset's keys in sample order, one per line [default: keys are indices].",
    )
    num_samples: int | None = option(
        None,
        bounds=_COUNT,
        help="Samples of the dataset [default: the keys' count, or the largest index + 1].",
    )


@dataclass(frozen=True, kw_only=True)
class ImportFkdConfig(ImportOptions):
    """``kdcache import fkd`` (kdcache.store.bridges.fkd.import_fkd)."""

    num_classes: int | None = option(
        None, bounds=_CLASSES, help="Required: the teacher's classes (1000 for ImageNet)."
    )
    files: str | None = option(
        None,
        path="file",
        help="The label files (relative to SOURCE) in sample order, one per line "
        "[default: sorted paths, ImageFolder's order].",
    )
    classes: str | None = option(
        None,
        path="file",
        help="The teacher's class folder names in label order, one per line [default: the class "
        "folders present, sorted; they must then number --num-classes].",
    )
    input_size: int | None = option(
        None,
        bounds=_COUNT,
        help="Required: the side S of kdcache's square dataset inputs: FKD's boxes (fractions of "
        "the image) become pixel boxes of them.",
    )


@dataclass(frozen=True, kw_only=True)
class ExportDistillkitConfig(Options):
    """``kdcache export distillkit`` (kdcache.store.bridges.distillkit.export_distillkit)."""

    top_k: int | None = option(
        None,
        bounds=_COUNT,
        help="Log-probs kept per token [default: K of a topk:K store; required for a dense one].",
    )
    rows_per_file: int = option(256, bounds=_COUNT, help="Samples per data_{i}.parquet file.")
