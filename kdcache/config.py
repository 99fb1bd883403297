"""Typed run configurations. Each is validated on construction and saved as JSON next to outputs.

Every field is declared once, here, with its default and its help text (:func:`option`); the
command line (:mod:`kdcache.cli`) builds its options from these fields, so adding an option to a
command is one field in its dataclass. This module imports neither click nor torch (the CLI
builds its options from it before any command runs): the parsers its checks call are imported
where they run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kdcache.augment.catalog import recipe_help
from kdcache.choices import (
    AMP_DTYPES,
    DATASET_KINDS,
    ENCODINGS,
    ENSEMBLE_MODES,
    INPUT_CHOICES,
    LR_SCHEDULES,
    MAX_VIEWS,
    MODELS,
    OPTIMIZERS,
    SPLITS,
    TRAIN_ON,
)
from kdcache.errors import ConfigError
from kdcache.logits.loss_options import (
    ALPHA,
    GAMMA,
    HYPER_PARAMETERS,
    IMAGE_LOSSES,
    SKEW,
    TEMPERATURE,
    TOKEN_LOSS_DECLARATIONS,
    TOP_K,
    HyperParameter,
    losses_taking,
)
from kdcache.options import (
    IMAGE,
    LM,
    MODALITY_NAMES,
    Bounds,
    Options,
    check_bounds,
    option,
    require,
)

T = TypeVar("T")

#: The distillation losses each kind of run accepts, by name (see kdcache.logits.loss_options).
LOSS_DECLARATIONS = {IMAGE: IMAGE_LOSSES, LM: TOKEN_LOSS_DECLARATIONS}
LOSS_CHOICES = {modality: tuple(losses) for modality, losses in LOSS_DECLARATIONS.items()}
#: Every loss name, image losses first.
ALL_LOSSES = tuple(dict.fromkeys(name for names in LOSS_CHOICES.values() for name in names))


def describe_losses() -> str:
    """Each loss with what it computes, by kind of run: the help of --loss."""
    return "; ".join(
        f"{MODALITY_NAMES[modality]}: "
        + ", ".join(f"{name} ({loss.summary})" for name, loss in losses.items())
        for modality, losses in LOSS_DECLARATIONS.items()
    )


def valid_losses() -> str:
    """The loss names by kind of run, for an error message."""
    return "; ".join(
        f"{', '.join(choices)} for {MODALITY_NAMES[kind]}" for kind, choices in LOSS_CHOICES.items()
    )


def hyper_option(parameter: HyperParameter, *, only: str | None = None) -> Any:
    """The option setting a loss hyper-parameter: its default and help from its declaration, the
    losses taking it named when not all do."""
    takers = losses_taking(parameter)
    used_by = "" if set(takers) == set(ALL_LOSSES) else f"; --loss {', '.join(takers)} only"
    return option(parameter.default, only=only, help=parameter.help.rstrip(".") + used_by + ".")


DEVICE_HELP = "cpu, cuda or cuda:N [default: cuda when available, else cpu]."
AUGMENT_HELP = recipe_help()
MODEL_HELP = (
    f"Model spec: {', '.join(MODELS.names())}, a torchvision model name, timm:NAME (needs "
    "kdcache[timm]), package.module:function, or hf:PATH (a causal language model, see "
    "docs/lm.md)."
)
DATASET_HELP = (
    f"Dataset spec: {', '.join(DATASET_KINDS.names())} with their arguments (e.g. fake:N, "
    "imagefolder:PATH, cifar10:ROOT; see docs/datasets.md), or text:FILE[:MAX_LEN], jsonl:FILE, "
    "parquet:FILE or hfdisk:FOLDER (each [:COLUMN][:MAX_LEN]) for a language model."
)
#: The store encodings, for the options that choose one.
ENCODING_LIST = ", ".join(ENCODINGS.forms())
AUGMENT_SEED_HELP = "Seed the views' parameters are drawn from"
VIEWS_HELP = (
    "Distinct views per sample, cycled through evenly over the epochs [default: one per epoch"
)

#: ``--train-on`` and ``--pack``, for every command that reads a language-model dataset.
TRAIN_ON_HELP = (
    "Tokens the loss counts: all, or assistant (chat data: the assistant's replies only; a dump "
    "then stores only their rows)"
)
PACK_HELP = (
    "Join the documents (EOS between them) and cut them into MAX_LENGTH-token sequences, "
    "instead of padding each document"
)

#: Seeds reach torch.manual_seed (at most 2^64 - 1) and numpy's generators (at least 0).
SEEDS = Bounds(0, 2**63 - 1)
#: Samples (a dump: views) per step; far above any memory, far below what Python's slicing takes.
BATCH_SIZES = Bounds(1, 1 << 24)
#: Adam's first step is 10 x lr per weight: it must stay a float32 (at most 3.4e38).
LEARNING_RATES = Bounds(0, 1e37, real=True, above_low=True)
#: Passes over the data: a million is already years of any real run.
EPOCHS = Bounds(1, 1_000_000)
#: AdamW's decoupled decay and the cosine's floor: any finite float32 at or above 0.
WEIGHT_DECAYS = MIN_LEARNING_RATES = Bounds(0, 1e37, real=True)
#: The gradients' global norm a step is clipped to (0: not clipped); any finite float32.
GRAD_NORMS = Bounds(0, 1e37, real=True)
#: Batches whose gradients add up to one optimisation step; far above any real accumulation.
ACCUMULATION_STEPS = Bounds(1, 1 << 20)
#: SGD's momentum factor (0: plain SGD); at 1 its buffer would never decay.
MOMENTA = Bounds(0, 1, real=True, below_high=True)
#: The weight average's decay per step (0: no average); at 1 it would never move.
EMA_DECAYS = Bounds(0, 1, real=True, below_high=True)
#: SGD's default momentum, as timm's and torchvision's ImageNet recipes use.
SGD_MOMENTUM = 0.9
#: Optimisation steps between evaluations (0: at each epoch's end only); far above any run.
EVAL_STEPS = Bounds(0, 1 << 62)
#: Warm-up in epochs, fractions too; no longer than the run (checked against --epochs).
WARMUP_EPOCHS = Bounds(0, EPOCHS.high, real=True)
#: Views per sample, as many as a store holds at most.
VIEWS = Bounds(1, MAX_VIEWS)
#: Worker processes or threads: more than any machine's cores, far fewer than would exhaust it.
DATA_WORKERS = Bounds(0, 1024)
WRITER_WORKERS = Bounds(1, 1024)


def check_views(augment: str | None, views: int | None, *, default: str) -> None:
    """A recipe parses; V within :data:`VIEWS`, and V > 1 only with a recipe (identical views
    would be waste)."""
    if augment is not None:
        from kdcache.augment.recipe import parse_recipe

        parse_recipe(augment)  # a malformed recipe fails here, naming what is wrong
    if views is not None:
        check_bounds("views", views, VIEWS)
        require(
            views == 1 or augment is not None,
            f"--views {views} needs --augment RECIPE (e.g. 'rrc:scale=0.35-1+flip'): without "
            f"augmentation every view would be the same input; {default}",
        )


def check_split(split: str | None) -> None:
    require(
        split is None or split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {split!r}"
    )


def check_train_on(train_on: str | None) -> None:
    require(
        train_on is None or train_on in TRAIN_ON,
        f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}",
    )


def check_speed_options(inputs: str, amp: str | None) -> None:
    require(
        inputs in INPUT_CHOICES,
        f"unknown input form {inputs!r}; valid choices: {', '.join(INPUT_CHOICES)}",
    )
    require(
        amp is None or amp in AMP_DTYPES,
        f"unknown amp dtype {amp!r}; valid choices: {', '.join(AMP_DTYPES)} (or leave it out)",
    )


def check_optimizer(optimizer: str, *, momentum: float) -> None:
    """A known optimizer, and a momentum other than the default for SGD only."""
    require(
        optimizer in OPTIMIZERS,
        f"unknown --optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}",
    )
    require(
        optimizer == "sgd" or momentum == SGD_MOMENTUM,
        f"--momentum {momentum:g} is SGD's, but the optimizer is {optimizer}; add --optimizer "
        "sgd or drop --momentum",
    )


def check_schedule(
    schedule: str, *, lr: float, min_lr: float, warmup_epochs: float, epochs: int
) -> None:
    """The learning-rate curve's options agree: a known schedule, a warm-up within the run, a
    floor below the peak that only the cosine reaches (their own ranges are checked by bounds)."""
    require(
        schedule in LR_SCHEDULES,
        f"unknown --lr-schedule {schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}",
    )
    if WARMUP_EPOCHS.admits(warmup_epochs) and EPOCHS.admits(epochs):
        require(
            warmup_epochs <= epochs,
            f"--warmup-epochs {warmup_epochs:g} is longer than the run (--epochs {epochs}); "
            f"give a number in [0, {epochs}]",
        )
    if not (MIN_LEARNING_RATES.admits(min_lr) and LEARNING_RATES.admits(lr)) or min_lr == 0:
        return
    require(
        schedule == "cosine",
        f"--min-lr {min_lr:g} is where --lr-schedule cosine ends, but the schedule is "
        f"{schedule}; add --lr-schedule cosine or drop --min-lr",
    )
    require(
        min_lr <= lr,
        f"--min-lr {min_lr:g} is above --lr {lr:g}; give a number in [0, {lr:g}]",
    )


@dataclass(frozen=True, kw_only=True)
class SpeedOptions(Options):
    """How inputs reach the device and how the models compute (docs/benchmarks.md); shared by
    training, distillation, sweeps and dumps."""

    inputs: str = option(
        "auto",
        choices=INPUT_CHOICES,
        only=IMAGE,
        help="What crosses to the device: float32 images, uint8 images normalised there, or "
        "(imagefolder) JPEG files decoded there; auto = jpeg on CUDA for imagefolder, else uint8.",
    )
    amp: str | None = option(
        None,
        choices=tuple(AMP_DTYPES),
        help="Autocast the forward passes to bf16 or fp16 (losses stay float32) [default: off].",
    )
    channels_last: bool = option(
        False, only=IMAGE, help="Channels-last memory format for models and images."
    )
    compile: bool = option(False, help="torch.compile the models (slow start, faster steps).")

    def __post_init__(self) -> None:
        check_speed_options(self.inputs, self.amp)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class TrainingOptions(SpeedOptions):
    """How any student is optimised: shared by training, distillation and every run of a sweep."""

    epochs: int = option(10, bounds=EPOCHS, help="Passes over the training split.")
    batch_size: int = option(
        64, bounds=BATCH_SIZES, help="Samples (sequences) per batch: per optimisation step."
    )
    grad_accum_steps: int = option(
        1,
        bounds=ACCUMULATION_STEPS,
        help="Batches whose gradients add up to one optimisation step (timm's "
        "--grad-accum-steps, transformers' gradient_accumulation_steps): a step then learns "
        "from N x --batch-size samples (sequences) as one batch that large would, each batch "
        "weighed by its samples (tokens), except for batch-norm statistics, which stay per "
        "batch. --warmup-epochs, --lr-schedule and --eval-every count optimisation steps.",
    )
    optimizer: str = option(
        "adam",
        choices=OPTIMIZERS,
        help="adam: Adam, AdamW with --weight-decay; sgd: SGD with Nesterov momentum "
        "(--momentum), as ResNet students on ImageNet are usually trained (timm's --opt sgd), "
        "with --weight-decay as its L2 penalty, at an --lr of about 0.1 x batch size / 256.",
    )
    lr: float = option(1e-3, bounds=LEARNING_RATES, help="Peak learning rate of the optimizer.")
    momentum: float = option(
        SGD_MOMENTUM, bounds=MOMENTA, help="Momentum of --optimizer sgd (0: plain SGD)."
    )
    lr_schedule: str = option(
        "constant",
        choices=LR_SCHEDULES,
        help="How the learning rate moves, per optimisation step: constant (the default, so "
        "earlier runs and documented results reproduce), or cosine from --lr down to --min-lr "
        "over the run; either after --warmup-epochs.",
    )
    warmup_epochs: float = option(
        0.0,
        bounds=WARMUP_EPOCHS,
        help="Epochs (fractions too, e.g. 0.5) of linear warm-up from 0 to --lr, per step, at "
        "most --epochs.",
    )
    min_lr: float = option(
        0.0,
        bounds=MIN_LEARNING_RATES,
        help="The learning rate --lr-schedule cosine ends at, at most --lr.",
    )
    weight_decay: float = option(
        0.0,
        bounds=WEIGHT_DECAYS,
        help="Weight decay of the weights: decoupled with adam (AdamW), an L2 penalty with "
        "sgd; biases and normalisation parameters (1-D) are not decayed; 0 = none.",
    )
    max_grad_norm: float = option(
        0.0,
        bounds=GRAD_NORMS,
        help="Clip the gradients' global L2 norm to this before each step (transformers' "
        "max_grad_norm, timm's --clip-grad; 1.0 is their usual value); each epoch then records "
        "its mean norm before clipping; 0 = no clipping.",
    )
    ema_decay: float = option(
        0.0,
        bounds=EMA_DECAYS,
        help="Keep an exponential moving average of the student's weights (and batch-norm "
        "statistics), updated after every optimisation step with this decay (timm's "
        "--model-ema-decay, e.g. 0.9998): evaluations score, and best/last hold, the average; "
        "it spans about 1/(1 - D) steps, which should be a small part of the run "
        "(docs/results.md); 0 = none.",
    )
    eval_every: int = option(
        0,
        bounds=EVAL_STEPS,
        help="Also evaluate on the held-out split every N optimisation steps of the run "
        "(transformers' eval_steps), within epochs; each evaluation is a line of metrics.jsonl "
        "and may become best/; 0 = at each epoch's end only.",
    )
    device: str | None = option(None, help=DEVICE_HELP)
    num_workers: int = option(0, bounds=DATA_WORKERS, help="DataLoader worker processes.")

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer, momentum=self.momentum)
        check_schedule(
            self.lr_schedule,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_epochs=self.warmup_epochs,
            epochs=self.epochs,
        )
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class LoopConfig(TrainingOptions):
    """Options of one training run: its folder and seed on top of :class:`TrainingOptions`."""

    out: str = option(path="dir", help="Run folder for checkpoints, metrics and config.")
    seed: int = option(0, bounds=SEEDS, help="Seed for initialisation and shuffling.")
    overwrite: bool = option(False, help="Replace a finished run already in --out.")
    resume: bool = option(
        False,
        help="Continue the interrupted run in --out from its last evaluation (its student, "
        "optimizer, schedule, data order and random generators), given the options it started "
        "with.",
    )
    resumable: bool = option(
        True,
        help="Save resume.pt at each evaluation so that --resume can continue an interrupted "
        "run (--no-resumable: no such save, which writes about three times the student each "
        "time).",
    )

    def __post_init__(self) -> None:
        require(
            not (self.overwrite and self.resume),
            "--overwrite and --resume exclude each other; pick one",
        )
        super().__post_init__()

    def save(self, path: Path, **resolved: Any) -> None:
        """Write the configuration plus values resolved at run time (device, dataset, ...)."""
        path.write_text(json.dumps({**self.to_dict(), "resolved": resolved}, indent=2) + "\n")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """Plain cross-entropy training of ``model`` on ``dataset``."""

    model: str = option(help=MODEL_HELP)
    dataset: str = option("digits", help=DATASET_HELP)
    split: str = option("train", choices=SPLITS, help="Split to train on; the other one validates.")
    augment: str | None = option(None, only=IMAGE, help=AUGMENT_HELP)
    augment_seed: int | None = option(
        None, only=IMAGE, bounds=SEEDS, help=f"{AUGMENT_SEED_HELP} [default: 0]."
    )
    views: int | None = option(None, only=IMAGE, bounds=VIEWS, help=f"{VIEWS_HELP}].")
    train_on: str = option("all", choices=TRAIN_ON, only=LM, help=f"{TRAIN_ON_HELP}.")
    pack: bool = option(False, only=LM, help=f"{PACK_HELP}.")

    def __post_init__(self) -> None:
        check_split(self.split)
        check_train_on(self.train_on)
        check_views(self.augment, self.views, default="drop --views")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class DistillOptions(TrainingOptions):
    """What a distillation run shares with every run of a sweep: the student, the transfer set
    (which samples of the store's dataset it trains on) and the losses' own options.

    The transfer set is the whole dataset by default; ``indices`` (a ``.npy`` or text file of
    sample indices, or the indices themselves) keeps a subset, ``exclude_classes`` leaves out
    every sample labelled with one of those classes. A dataset whose samples have no label
    (label -1, e.g. ``unlabeled:SPEC``) trains on the soft targets only and needs ``alpha`` 1.
    """

    student: str = option(help="Student model spec (see `kdcache train --help`).")
    dataset: str | None = option(
        None,
        help="Dataset spec [default: the one recorded in the store]; checked against its "
        "fingerprint. unlabeled:SPEC drops its labels (soft targets only: alpha 1).",
    )
    split: str | None = option(
        None, choices=SPLITS, help="Dataset split [default: the one recorded in the store]."
    )
    indices: str | tuple[int, ...] | None = option(
        None,
        path="file",
        only=IMAGE,
        help="Transfer set: train on these sample indices only (a .npy file, or a text file of "
        "integers separated by spaces, commas or newlines) [default: every sample].",
    )
    exclude_classes: tuple[int | str, ...] = option(
        (),
        example="3,5",
        only=IMAGE,
        help="Transfer set: leave out the samples labelled with these comma-separated classes, "
        "by index or (image folders) by name, e.g. 3,5 or cat,dog.",
    )
    teacher_weights: tuple[float, ...] = option(
        (),
        example="0.5,0.5",
        help="With several --cache: one weight >= 0 per store, in their order, normalised to sum "
        "to 1 [default: equal].",
    )
    teacher_mix: str = option(
        "mean",
        choices=ENSEMBLE_MODES,
        help="With several --cache: mean of the teachers' logits, or mixture of their softmaxes "
        "at --temperature (as `kdcache merge --mode`).",
    )
    gamma: float = hyper_option(GAMMA, only=IMAGE)
    top_k: int = hyper_option(TOP_K, only=IMAGE)
    skew: float = hyper_option(SKEW, only=LM)
    cache_memory: int | str | None = option(
        None,
        help="RAM for decoded logits, e.g. 8GiB; a larger store streams chunk by chunk "
        "[default: half the available memory].",
    )
    train_on: str | None = option(
        None,
        choices=TRAIN_ON,
        only=LM,
        help=f"{TRAIN_ON_HELP} [default: the store's, else all].",
    )
    pack: bool = option(
        False, only=LM, help=f"{PACK_HELP} [default: as the store was dumped, else off]."
    )

    def __post_init__(self) -> None:
        check_split(self.split)
        check_train_on(self.train_on)
        if self.cache_memory is not None:
            from kdcache.store.read.feed import parse_size

            parse_size(self.cache_memory)  # raises ConfigError for an unreadable size
        for parameter in (GAMMA, TOP_K, SKEW):
            parameter.check(getattr(self, parameter.name))
        excluded = tuple(self.exclude_classes)
        require(
            all(
                (isinstance(c, int | np.integer) and not isinstance(c, bool) and c >= 0)
                or (isinstance(c, str) and c.strip() != "")
                for c in excluded
            ),
            f"exclude_classes must be class indices >= 0 or class names, got {list(excluded)}; "
            "e.g. 3,5",
        )
        excluded = tuple(c if isinstance(c, str) else int(c) for c in excluded)
        object.__setattr__(self, "exclude_classes", excluded)  # lists in, tuples kept
        if self.indices is not None and not isinstance(self.indices, str):
            object.__setattr__(self, "indices", _integers(self.indices, "indices"))
        object.__setattr__(
            self, "teacher_weights", tuple(float(weight) for weight in self.teacher_weights)
        )
        require(
            self.teacher_mix in ENSEMBLE_MODES,
            f"unknown --teacher-mix {self.teacher_mix!r}; valid choices: "
            f"{', '.join(ENSEMBLE_MODES)}",
        )
        super().__post_init__()


def _integers(values: Any, name: str) -> tuple[int, ...]:
    array = np.asarray(values)
    require(
        array.ndim == 1
        and (array.size == 0 or np.issubdtype(array.dtype, np.integer))
        # uint64 holds numbers no int64 index array can
        and not (array.dtype == np.uint64 and array.size and array.max() >= 2**63),
        f"{name} must be a sequence of integers, got {values!r}",
    )
    return tuple(int(value) for value in array)


def _one_or_more_stores(cache: Any) -> str | tuple[str, ...] | None:
    """``--cache`` as kept: one store as its path, several as a tuple (the command line gives a
    tuple, Python a path, a string or a sequence)."""
    if cache is None or isinstance(cache, str):
        return cache
    if isinstance(cache, os.PathLike):
        return os.fspath(cache)
    stores = tuple(str(store) for store in cache)
    return None if not stores else stores[0] if len(stores) == 1 else stores


def _stores(cache: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if cache is None:
        return ()
    return (cache,) if isinstance(cache, str) else cache


@dataclass(frozen=True, kw_only=True)
class DistillConfig(DistillOptions, LoopConfig):
    """Distillation of ``student`` from a cached store, or from a live teacher when ``cache`` is
    None.

    With a cache, ``dataset`` and ``split`` default to those recorded in the store, and
    ``cache_memory`` (bytes or e.g. ``"8GiB"``; default half the available memory) bounds the
    decoded logits held in RAM (see :mod:`kdcache.store.read.feed`).
    """

    cache: str | tuple[str, ...] | None = option(
        None,
        multiple=True,
        help="Teacher logit store written by `kdcache dump-teacher`: a path, URL or .zip; repeat "
        "it for several teachers of one dataset, combined in the loss (--teacher-mix).",
    )
    teacher: str | None = option(
        None,
        help="Online baseline only: teacher spec run in the loop instead of --cache [default: "
        "the one --weights records].",
    )
    weights: str | None = option(
        None, path="file", only=IMAGE, help="Online baseline only: the teacher's weights."
    )
    loss: str = option(
        "kd", choices=ALL_LOSSES, help=f"Distillation loss, for {describe_losses()}."
    )
    temperature: float = hyper_option(TEMPERATURE)
    alpha: float = hyper_option(ALPHA)

    augment: str | None = option(
        None,
        only=IMAGE,
        help=f"{AUGMENT_HELP} With --cache: must equal the store's [default: the store's].",
    )
    augment_seed: int | None = option(
        None,
        only=IMAGE,
        bounds=SEEDS,
        help=f"{AUGMENT_SEED_HELP} [default: 0; with --cache the store's].",
    )
    views: int | None = option(
        None, only=IMAGE, bounds=VIEWS, help=f"{VIEWS_HELP}; with --cache the store's V]."
    )
    student_augment: str | None = option(
        None,
        only=IMAGE,
        help="Extra augmentation of the student's input only (no mixing), e.g. 'flip'; breaks "
        "teacher-student consistency (a warning says so).",
    )

    @property
    def stores(self) -> tuple[str, ...]:
        """Every teacher store of the run, in order (none for online distillation)."""
        return _stores(self.cache)

    def __post_init__(self) -> None:
        from kdcache.augment.recipe import parse_recipe

        object.__setattr__(self, "cache", _one_or_more_stores(self.cache))
        if len(self.stores) < 2:
            require(
                not self.teacher_weights and self.teacher_mix == "mean",
                "--teacher-weights and --teacher-mix combine several teachers; give two or more "
                "--cache stores, or drop them",
            )
        else:
            require(
                len(self.teacher_weights) in (0, len(self.stores)),
                f"--teacher-weights lists {len(self.teacher_weights)} weights for "
                f"{len(self.stores)} --cache stores; give one per store, in their order",
            )
            require(
                all(math.isfinite(w) and w >= 0 for w in self.teacher_weights)
                and (not self.teacher_weights or sum(self.teacher_weights) > 0),
                f"--teacher-weights must be finite numbers >= 0, not all 0, got "
                f"{','.join(map(str, self.teacher_weights))}",
            )
        if self.cache is None:
            check_views(self.augment, self.views, default="drop --views")
        elif self.augment is not None:
            parse_recipe(self.augment)
        if self.student_augment is not None:
            require(
                not parse_recipe(self.student_augment).mixes,
                f"--student-augment {self.student_augment!r} cannot mix samples (mixup, cutmix): "
                "the teacher's logits cover only the student's own sample; drop the mixing",
            )
        require(
            self.loss in ALL_LOSSES, f"unknown loss {self.loss!r}; valid losses: {valid_losses()}"
        )
        TEMPERATURE.check(self.temperature)
        ALPHA.check(self.alpha)
        if self.cache is None:
            require(
                self.teacher is not None or self.weights is not None,
                "distill needs --cache STORE, or --teacher SPEC and --dataset SPEC (text:FILE for "
                "a language model), or --weights CKPT of `kdcache train`, for online distillation",
            )
            require(
                self.cache_memory is None,
                "--cache-memory only applies with --cache STORE; drop it for online distillation",
            )
        else:
            require(
                self.teacher is None and self.weights is None,
                "--teacher/--weights make no sense with --cache: the cache replaces the teacher; "
                "drop one",
            )
        super().__post_init__()

    def loss_options(self) -> dict[str, float]:
        """Every loss hyper-parameter of this run; each loss takes those it declares
        (:func:`kdcache.logits.losses.construct`)."""
        return {parameter.name: getattr(self, parameter.name) for parameter in HYPER_PARAMETERS}

    def check_loss(self, modality: str) -> None:
        """Refuse a loss that the ``modality`` run has no form of, naming the valid ones."""
        choices = LOSS_CHOICES[modality]
        require(
            self.loss in choices,
            f"unknown loss {self.loss!r} for {MODALITY_NAMES[modality]}; valid losses: "
            f"{', '.join(choices)}",
        )


#: ``--fsync``, for every command that writes a store.
FSYNC_HELP = (
    "fsync each chunk of a local store before marking it written (--no-fsync: faster, but a "
    "power loss can leave chunks marked written that never reached the disk)."
)


@dataclass(frozen=True, kw_only=True)
class DumpConfig(SpeedOptions):
    """Run ``teacher`` once over ``dataset``/``split`` and store its raw logits at ``out``."""

    teacher: str | None = option(
        None,
        help="Teacher model spec (see `kdcache train --help`) [default: the one --weights "
        "records].",
    )
    weights: str | None = option(
        None, path="file", help="Teacher state_dict or checkpoint from `kdcache train`."
    )
    dataset: str | None = option(
        None,
        help="Dataset spec to run the teacher over [default: the one --weights records, else "
        "digits].",
    )
    split: str = option("train", choices=SPLITS, help="Dataset split.")
    out: str = option("teacher.zarr", help="Store to create: a path or an fsspec URL (s3://...).")
    encoding: str = option(
        "float16",
        help=f"How logits are stored: {ENCODING_LIST} (see docs/encodings.md: int8 keeps a "
        "per-row scale/offset; topk:K the K largest logits plus tail statistics, any --temperature "
        "at distill time, topk:K:8 the same in about 30% fewer bytes (8-bit values); sampled:S S "
        "draws per row, distilled at --temperature 1 only).",
    )
    batch_size: int = option(
        256,
        bounds=BATCH_SIZES,
        help="Samples per teacher forward pass; --resume needs the one the dump started with.",
    )
    num_workers: int = option(0, bounds=DATA_WORKERS, help="DataLoader worker processes.")
    device: str | None = option(None, help=DEVICE_HELP)
    device_map: str | None = option(
        None,
        only=LM,
        help="Shard an hf:PATH teacher across the local devices with Transformers' own "
        "device_map (auto, balanced, sequential, or one device such as cuda:1) [default: "
        "the whole teacher on --device].",
    )
    chunk_rows: int | None = option(
        None, help="Rows per Zarr chunk [default: about 1 MiB per chunk]."
    )
    overwrite: bool = option(False, help="Replace an existing store at --out.")
    resume: bool = option(False, help="Continue an interrupted dump at --out.")
    views: int = option(
        1,
        bounds=VIEWS,
        help="Augmented views V per sample, each stored with its parameters (needs --augment); "
        "--batch-size then counts views.",
    )
    augment: str | None = option(None, help=f"{AUGMENT_HELP} Drawn once per stored view.")
    augment_seed: int = option(0, bounds=SEEDS, help=f"{AUGMENT_SEED_HELP}.")
    writer_workers: int | None = option(
        None,
        bounds=WRITER_WORKERS,
        help="Threads that encode, compress and write the logits beside the teacher "
        "[default: a quarter of the cores, 1 to 8; see `kdcache bench dump --writer-only`].",
    )
    fsync: bool = option(
        True,
        help=FSYNC_HELP,
    )
    train_on: str = option("all", choices=TRAIN_ON, only=LM, help=f"{TRAIN_ON_HELP}.")
    pack: bool = option(False, only=LM, help=f"{PACK_HELP}.")

    def __post_init__(self) -> None:
        check_split(self.split)
        check_train_on(self.train_on)
        require(
            self.teacher is not None or self.weights is not None,
            "dump-teacher needs --teacher SPEC (e.g. --teacher resnet18), or --weights CKPT "
            "written by `kdcache train` (which records its model)",
        )
        check_views(self.augment, self.views, default="or dump with --views 1")
        require(
            self.chunk_rows is None or self.chunk_rows >= 1,
            f"--chunk-rows must be >= 1, got {self.chunk_rows}",
        )
        require(
            not (self.overwrite and self.resume),
            "--overwrite and --resume exclude each other; pick one",
        )
        from kdcache.logits.encodings import parse_encoding

        parse_encoding(self.encoding)  # a bad name fails here, listing the valid encodings
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class SweepConfig(DistillOptions):
    """A grid of distillation runs from one store: every loss x alpha x temperature x seed.

    Every other option (the student, the transfer set, ``epochs``, ``batch_size``, ...) is a field
    of :class:`DistillOptions`, shared by every run and meaning what it means in
    :class:`~kdcache.config.DistillConfig`.
    """

    cache: str | tuple[str, ...] = option(
        multiple=True,
        help="Teacher logit store written by `kdcache dump-teacher`; repeat it for several "
        "teachers of one dataset, combined in every run's loss (--teacher-mix).",
    )
    out: str = option(
        path="dir", help="Sweep folder: one run folder per setting, results.csv, sweep.png."
    )
    temperatures: tuple[float, ...] = option(
        (1.0, 2.0, 4.0, 8.0, 16.0),
        example="1,2,4,8,16",
        help="Comma-separated temperatures T (> 0).",
    )
    alphas: tuple[float, ...] = option(
        (ALPHA.default,),
        example="0.5,0.7,1",
        help="Comma-separated soft-loss weights in [0, 1]; 1 = soft targets only.",
    )
    losses: tuple[str, ...] = option(
        ("kd",),
        example="kd,focal",
        help=f"Comma-separated losses among {', '.join(IMAGE_LOSSES)} (image students).",
    )
    seeds: tuple[int, ...] = option(
        (0,),
        example="0,1,2",
        bounds=SEEDS,
        help="Comma-separated seeds; results are mean ± std over them.",
    )
    jobs: int = option(
        1, help="Runs trained at once, in separate processes that share one decoded store."
    )

    @property
    def stores(self) -> tuple[str, ...]:
        """Every teacher store of the sweep, in order."""
        return _stores(self.cache)

    def __post_init__(self) -> None:
        cache = _one_or_more_stores(self.cache)
        if cache is None:
            raise ConfigError("sweep needs a --cache store; e.g. --cache teacher.zarr")
        object.__setattr__(self, "cache", cache)
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}; e.g. --jobs 4")
        super().__post_init__()
        for field in dataclasses.fields(self):
            if field.name not in _GRID:
                continue
            values = tuple(getattr(self, field.name))
            # lists in, tuples kept: the config stays hashable
            object.__setattr__(self, field.name, values)
            if not values:
                raise ConfigError(
                    f"--{field.name} needs at least one value; e.g. --{field.name} "
                    f"{field.metadata['example']}"
                )
            if len(set(values)) != len(values):
                raise ConfigError(
                    f"--{field.name} lists a value twice: {','.join(map(str, values))}; "
                    "list each once"
                )
        for loss in self.losses:
            if loss not in IMAGE_LOSSES:
                raise ConfigError(
                    f"unknown loss {loss!r} in --losses; valid losses: {', '.join(IMAGE_LOSSES)}"
                )
        self.runs()  # every run's DistillConfig validates its own values (temperature > 0, ...)

    def runs(self) -> list[DistillConfig]:
        """One :class:`DistillConfig` per run, in loss, alpha, temperature, seed order."""
        shared = {field.name: getattr(self, field.name) for field in SHARED_FIELDS}
        return [
            DistillConfig(
                cache=self.cache,
                loss=loss,
                alpha=alpha,
                temperature=temperature,
                seed=seed,
                out=os.path.join(self.out, run_name(loss, alpha, temperature, seed)),
                **shared,
            )
            for loss in self.losses
            for alpha in self.alphas
            for temperature in self.temperatures
            for seed in self.seeds
        ]


#: The swept options, one value per run.
_GRID = ("temperatures", "alphas", "losses", "seeds")
#: The options every run of a sweep shares with each other and with DistillConfig.
SHARED_FIELDS = dataclasses.fields(DistillOptions)


def setting_name(loss: str, alpha: float, temperature: float) -> str:
    """The name of a setting (a run without its seed), e.g. ``kd-a0.7-T4``."""
    return f"{loss}-a{alpha:g}-T{temperature:g}"


def run_name(loss: str, alpha: float, temperature: float, seed: int) -> str:
    """The folder of one run under the sweep's ``out``, e.g. ``kd-a0.7-T4-seed0``."""
    return f"{setting_name(loss, alpha, temperature)}-seed{seed}"
