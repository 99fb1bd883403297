"""Train a model with cross-entropy, or distill a student from a store or a live teacher: each
run composes a :class:`~kdcache.train.tasks.Task`, a
:class:`~kdcache.train.teachers.TeacherSource` and the one loop :func:`~kdcache.train.fit.fit`.

Images and language models take the same configurations and the same entry points: a run is a
language-model run when a model is ``hf:PATH``, the dataset ``text:FILE`` or the cache a sequence
store (:mod:`kdcache.train.tokens` builds those). This module builds the image runs' datasets,
loss and ``config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Sampler

from kdcache._version import __version__
from kdcache.checkpoints import load_checkpoint, resolve_specs
from kdcache.config import DistillConfig, TrainConfig
from kdcache.data.datasets import LabeledDataset, build_dataset, labeled_spec
from kdcache.data.device_input import DeviceBatch, resolve_inputs
from kdcache.distributed import RankSession, rank_session
from kdcache.errors import ConfigError
from kdcache.lm.dispatch import is_lm_run
from kdcache.logits.ensemble import ensemble_weights
from kdcache.logits.losses import build_loss
from kdcache.models import build_model, check_input_fits, load_weights, weights_sha256
from kdcache.options import IMAGE, LM, refuse_foreign_options
from kdcache.plots.figures import plot_distributions
from kdcache.runtime import prepare_model
from kdcache.store.read.private_folder import adopt_private_folder, private_folder
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.sequence import SequenceReader
from kdcache.store.tools.merge import check_same_rows, warn_mixture_temperature
from kdcache.train.fit import RunResult, fit, held_out_split
from kdcache.train.preflight import check_store_run, store_dataset
from kdcache.train.resume import start_run_folder
from kdcache.train.tasks import Classification, LogitDistillation, evaluate
from kdcache.train.teachers import EnsembleLogits, LiveLogits, StoreLogits, TeacherSource
from kdcache.train.tokens import distill_tokens, train_tokens
from kdcache.train.transfer import (
    TransferSampler,
    describe_transfer,
    refuse_transfer_set_with_views,
    transfer_rows,
)
from kdcache.train.views import Views, cached_views, drawn_views, first_rows

if TYPE_CHECKING:
    from kdcache.augment.views import ViewDataset

__all__ = ["RunResult", "distill", "evaluate", "fit", "held_out_split", "modality", "train"]


def modality(*models: str | None, dataset: str | None = None, cache: str | None = None) -> str:
    """:data:`~kdcache.options.LM` for a language-model run, else :data:`~kdcache.options.IMAGE`."""
    return LM if is_lm_run(models=models, dataset=dataset, cache=cache) else IMAGE


def train(config: TrainConfig) -> RunResult:
    """Plain cross-entropy training (a teacher, or the CE-only student baseline), of an image
    model or a language model."""
    kind = modality(config.model, dataset=config.dataset)
    refuse_foreign_options(config, kind)
    with rank_session(config.device) as session:
        if kind == LM:
            return train_tokens(config, session)
        return _train(config, session)


def _seeded_model(spec: str, dataset: LabeledDataset, seed: int) -> torch.nn.Module:
    """The student built under the run's seed, checked against the dataset's input shape."""
    torch.manual_seed(seed)
    model = build_model(spec, num_classes=dataset.num_classes, in_channels=dataset.in_channels)
    check_input_fits(model, tuple(dataset.float_input(0).shape), spec=spec)
    return model


def _train(config: TrainConfig, session: RankSession) -> RunResult:
    device = session.device
    train_set = build_dataset(config.dataset, split=config.split)
    unlabeled = int((train_set.labels < 0).sum())
    if unlabeled:
        raise ConfigError(
            f"train needs labels but {unlabeled} samples of dataset {config.dataset!r} have none "
            "(label -1); train on a labelled dataset, or distill from a teacher with --alpha 1"
        )
    inputs = resolve_inputs(config.inputs, train_set, device, views=config.augment is not None)
    train_set = train_set.with_inputs(inputs)
    val_set = build_dataset(config.dataset, split=held_out_split(config.split)).with_inputs(inputs)
    out = Path(config.out)
    views = drawn_views(
        train_set,
        augment=config.augment,
        augment_seed=config.augment_seed,
        views=config.views,
        epochs=config.epochs,
        seed=config.seed,
    )
    session.refuse_unsharded(views is not None, "augmentation (--augment)")
    # Built before the run folder exists, so that a model that cannot be built leaves nothing.
    model = _seeded_model(config.model, val_set, config.seed)
    session.on_main(
        lambda: start_run_folder(
            config,
            marker=Classification.finished_marker,
            command="train",
            device=str(device),
            inputs=inputs,
            kdcache_version=__version__,
            views=None if views is None else views.dataset.views,
            ranks=session.info.world_size,
        )
    )
    return fit(
        task=Classification(model, config.model, views=views),
        train_set=train_set if views is None else views.dataset,
        val_set=val_set,
        config=config,
        out=out,
        session=session,
        sampler=None if views is None else views.sampler,
    )


def distill(
    config: DistillConfig,
    *,
    reader: StoreReader | SequenceReader | None = None,
    members: Sequence[StoreReader] = (),
) -> RunResult:
    """Train ``config.student`` on the distillation loss against a store's (or a live teacher's)
    logits: an image classifier, or a causal language model (``hf:PATH``).

    ``reader`` is ``config.cache`` already opened (:func:`~kdcache.store.read.reader.open_store`, or
    :func:`~kdcache.store.sequence.open_sequence_store` for a language model): pass it to share
    one decoded store across many runs (as :func:`kdcache.train.sweep.run_sweep` does). With
    several stores, ``members`` are all of ``config.stores`` opened, in order (``reader`` is then
    the first or None). Under torchrun every rank runs this with the same config
    (DistributedDataParallel).
    """
    if (reader is not None or members) and config.cache is None:
        raise ConfigError(
            "an open store was passed to distill() but config.cache is None; set cache to its path"
        )
    if members:
        if len(members) != len(config.stores) or reader not in (None, members[0]):
            raise ConfigError(
                f"distill() got {len(members)} open stores for the {len(config.stores)} of "
                "config.cache; pass every one of them, in order (reader, if given, the first)"
            )
        reader, members = members[0], members if len(members) > 1 else ()
    if config.cache is None:
        teacher, dataset = resolve_specs(
            config.weights,
            model=config.teacher,
            dataset=config.dataset,
            model_option="--teacher",
            default_dataset=None,
        )
        config = dataclasses.replace(config, teacher=teacher, dataset=dataset)
    if reader is None:
        first = config.stores[0] if config.stores else None
        kind = modality(config.student, config.teacher, dataset=config.dataset, cache=first)
    else:
        kind = LM if isinstance(reader, SequenceReader) else IMAGE
    config.check_loss(kind)
    refuse_foreign_options(config, kind)
    if kind == LM and len(config.stores) > 1:
        raise ConfigError(
            f"several --cache stores are combined for image models only, got "
            f"{len(config.stores)} token stores; merge them first (`kdcache merge`) and distill "
            "the merged store"
        )
    with rank_session(config.device) as session:
        if kind == LM:
            assert not isinstance(reader, StoreReader)
            return distill_tokens(config, session, store=reader)
        assert not isinstance(reader, SequenceReader)
        return _distill(config, session, reader=reader, members=members)


@dataclass
class _Teaching:
    """A distillation's teacher source with the training set and order it comes with."""

    teacher: TeacherSource
    train_set: LabeledDataset
    rows: np.ndarray | None
    sampler: Sampler[int] | None
    views: Views | None
    resolved: dict[str, Any] = field(default_factory=dict)


def _from_store(
    config: DistillConfig,
    session: RankSession,
    reader: StoreReader,
    members: Sequence[StoreReader] = (),
) -> _Teaching:
    """The teaching of a store, or with ``members`` (every store of a multi-teacher run, the
    first being ``reader``) of their ensemble, combined batch by batch."""
    for store in members or (reader,):
        store.encoding.check_distill_temperature(config.temperature)
    train_set = store_dataset(reader, config.dataset, config.split)
    rows = check_store_run(config, reader, train_set)
    for member in members[1:]:
        check_same_rows(reader, member, action="distill from")
        check_store_run(config, member, train_set)
    # Ranks on one machine share one decoded table instead of one copy each, in the private
    # folder their local rank 0 found (one it made in place of a planted one has a random name).
    shared = session.info.local_world_size > 1
    if shared:
        adopt_private_folder(str(session.on_local_main(private_folder)))
    for store in members or (reader,):
        warn_mixture_temperature(store, config.temperature)
        store.feed.load(shared=shared)
    feed = reader.feed
    # In memory any order is fast, so keep the seeded shuffle (the online run's order too);
    # a chunked feed must dictate the order for each chunk to be decoded once per epoch.
    sampler: Sampler[int] | None = None
    if rows is not None:
        sampler = TransferSampler(rows, seed=config.seed, feed=feed)
    elif feed.mode == "chunked":
        sampler = feed.sampler(
            seed=config.seed, rank=session.info.rank, world_size=session.info.world_size
        )
    views = cached_views(
        reader,
        train_set,
        augment=config.augment,
        augment_seed=config.augment_seed,
        views=config.views,
        student_augment=config.student_augment,
        seed=config.seed,
        feed=feed,
    )
    resolved: dict[str, Any] = {
        "store": reader.metadata.to_dict(),
        "feed": {"mode": feed.mode, "memory_budget": feed.memory_budget},
    }
    if not members:
        return _Teaching(StoreLogits(feed, views), train_set, rows, sampler, views, resolved)
    weights = ensemble_weights(config.teacher_weights, len(members), option="--teacher-weights")
    source = EnsembleLogits(
        [member.feed for member in members],
        views,
        weights=weights,
        mode=config.teacher_mix,
        temperature=config.temperature,
    )
    resolved["ensemble"] = {
        "mode": config.teacher_mix,
        "temperature": config.temperature,
        "weights": list(weights),
        "stores": [
            {
                "store": member.where,
                "generation": member.metadata.generation,
                "content_sha256": member.content_digest(),
                "encoding": member.metadata.encoding,
                "teacher": member.metadata.teacher,
            }
            for member in members
        ],
    }
    return _Teaching(source, train_set, rows, sampler, views, resolved)


def _from_live_teacher(config: DistillConfig, session: RankSession) -> _Teaching:
    assert config.teacher is not None
    assert config.dataset is not None
    train_set = build_dataset(config.dataset, split=config.split or "train")
    rows = transfer_rows(config, train_set)
    views = drawn_views(
        train_set,
        augment=config.augment,
        augment_seed=config.augment_seed,
        views=config.views,
        epochs=config.epochs,
        seed=config.seed,
        student_augment=config.student_augment,
    )
    model = build_model(
        config.teacher, num_classes=train_set.num_classes, in_channels=train_set.in_channels
    )
    resolved = {}
    if config.weights is not None:
        load_checkpoint(model, config.weights, spec=config.teacher, dataset=train_set)
        resolved["teacher_weights_sha256"] = weights_sha256(config.weights)
    _teacher, forward = prepare_model(
        model.eval().requires_grad_(False),
        device=session.device,
        channels_last=config.channels_last,
        compile=config.compile,
    )
    sampler = None if rows is None else TransferSampler(rows, seed=config.seed)
    source = LiveLogits(forward, device=session.device, amp=config.amp)
    return _Teaching(source, train_set, rows, sampler, views, resolved)


def _distill(
    config: DistillConfig,
    session: RankSession,
    *,
    reader: StoreReader | None,
    members: Sequence[StoreReader] = (),
) -> RunResult:
    device = session.device
    if config.stores:
        reader = reader or open_store(config.stores[0], memory_budget=config.cache_memory)
        if len(config.stores) > 1 and not members:
            opened = (open_store(s, memory_budget=config.cache_memory) for s in config.stores[1:])
            members = [reader, *opened]
        teaching = _from_store(config, session, reader, members)
    else:
        teaching = _from_live_teacher(config, session)
    views, rows = teaching.views, teaching.rows
    inputs = resolve_inputs(config.inputs, teaching.train_set, device, views=views is not None)
    train_set = teaching.train_set.with_inputs(inputs)
    # An unlabeled transfer set (unlabeled:SPEC) is validated on SPEC's labelled held-out split.
    val_set = build_dataset(labeled_spec(train_set.spec), split=held_out_split(train_set.split))
    val_set = val_set.with_inputs(inputs)
    session.refuse_unsharded(rows is not None, "a transfer set (--indices, --exclude-classes)")
    session.refuse_unsharded(views is not None, "views (--augment or a store with views)")
    sampler = teaching.sampler
    resolved: dict[str, Any] = {
        "command": "distill",
        "device": str(device),
        "kdcache_version": __version__,
        "ranks": session.info.world_size,  # --batch-size is per rank
        **teaching.resolved,
        "dataset": train_set.spec,
        "split": train_set.split,
        "inputs": inputs,
        "transfer": describe_transfer(rows, train_set),
    }
    refuse_transfer_set_with_views(rows, views=views is not None)
    if views is not None:
        sampler = views.sampler
        resolved["views"] = views.dataset.views
        resolved["view_sampler"] = views.drawn_by
    out = Path(config.out)
    # Built before the run folder exists, so that a model that cannot be built leaves nothing.
    student = _seeded_model(config.student, val_set, config.seed)
    criterion = build_loss(config.loss, **config.loss_options())
    session.on_main(
        lambda: start_run_folder(config, marker=LogitDistillation.finished_marker, **resolved)
    )
    result = fit(
        task=LogitDistillation(
            student, config.student, criterion=criterion, alpha=config.alpha, views=views
        ),
        train_set=train_set if views is None else views.dataset,
        val_set=val_set,
        config=config,
        out=out,
        session=session,
        teacher=teaching.teacher,
        sampler=sampler,
    )
    if session.is_main:
        _plot_final_distributions(
            out,
            config=config,
            dataset=train_set if views is None else views.dataset,
            reader=reader,
            teacher=teaching.teacher,
            device=device,
        )
    return result


def _plot_final_distributions(
    out: Path,
    *,
    config: DistillConfig,
    dataset: LabeledDataset | ViewDataset,
    reader: StoreReader | None,
    teacher: TeacherSource,
    device: torch.device,
    num_samples: int = 4,
) -> None:
    """Write ``distributions.png``: teacher vs final student on the first sample of a few classes
    (its first view in a run with views).

    The teacher's side comes from the store when there is one (dense, at the run's temperature),
    else from the live teacher.
    """
    labelled = np.flatnonzero(dataset.labels >= 0)
    if labelled.size:
        _classes, first = np.unique(dataset.labels[labelled], return_index=True)
        first = labelled[first]
    else:  # an unlabeled dataset: samples spread over it
        first = np.arange(len(dataset))
    picked = np.linspace(0, len(first) - 1, min(num_samples, len(first))).round().astype(int)
    samples = np.sort(first[picked])
    indices = torch.from_numpy(first_rows(dataset, samples))
    float_input = getattr(dataset, "float_input", lambda i: dataset[i][0])
    inputs = torch.stack([float_input(int(i)) for i in indices]).to(device)
    labels = [dataset[int(i)][1] for i in indices]
    student = build_model(
        config.student, num_classes=dataset.num_classes, in_channels=dataset.in_channels
    )
    load_weights(student, out / "last.pt", spec=config.student)
    student.to(device).eval()
    with torch.no_grad():
        student_logits = student(inputs).cpu()
        if isinstance(teacher, EnsembleLogits):
            teacher_logits = teacher.ensemble(indices)
        elif reader is not None:
            teacher_logits = reader.read_dense(indices, temperature=config.temperature)
        else:
            batch = DeviceBatch(inputs, torch.tensor(labels, device=device), indices)
            teacher_logits = teacher.targets(batch).cpu()
    plot_distributions(
        teacher_logits,
        student_logits,
        labels,
        out / "distributions.png",
        temperature=config.temperature,
        sample_ids=samples.tolist(),
        class_names=getattr(getattr(dataset, "dataset", dataset), "class_names", None),
    )
