"""Train a model with cross-entropy, or distill a student from a cached store or a live teacher.

Both run the shared loop :func:`kdcache.train.fit.fit`, which writes the run folder; this module
builds each run's datasets, loss and ``config.json``. ``RunResult``, ``fit``, ``evaluate`` and
``held_out_split`` are re-exported here, where callers have always imported them from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from kdcache._version import __version__
from kdcache.config import DistillConfig, TrainConfig
from kdcache.data.datasets import LabeledDataset, build_dataset, labeled_spec
from kdcache.data.device_input import Attach, DeviceBatch, resolve_inputs
from kdcache.distributed import RankSession, rank_session
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.logits.losses import build_loss, total_loss
from kdcache.logits.sparse import TeacherInput
from kdcache.models import build_model, load_weights, weights_sha256
from kdcache.plots.figures import plot_distributions
from kdcache.run_folder import prepare_output_dir
from kdcache.runtime import autocast, prepare_model
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.train.fit import BatchLoss, RunResult, evaluate, fit, held_out_split
from kdcache.train.pairing import check_store_matches
from kdcache.train.transfer import TransferSampler, describe_transfer, transfer_rows
from kdcache.train.views import cached_views, drawn_views, first_rows

if TYPE_CHECKING:
    from kdcache.augment.views import ViewDataset

__all__ = [
    "BatchLoss",
    "RunResult",
    "distill",
    "evaluate",
    "fit",
    "held_out_split",
    "train",
]


def train(config: TrainConfig) -> RunResult:
    """Plain cross-entropy training (the teacher, or the CE-only student baseline)."""
    with rank_session(config.device) as session:
        return _train(config, session)


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
    session.on_main(
        lambda: config.save(
            prepare_output_dir(out, overwrite=config.overwrite) / "config.json",
            command="train",
            device=str(device),
            inputs=inputs,
            kdcache_version=__version__,
            views=None if views is None else views.dataset.views,
            ranks=session.info.world_size,
        )
    )

    def cross_entropy(logits: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
        loss = F.cross_entropy(logits, batch.labels)
        mixed = (
            None
            if views is None
            else views.mixed_hard_loss(logits, batch.labels, views.rows(batch.indices))
        )
        return loss if mixed is None else loss + mixed

    return fit(
        model_spec=config.model,
        train_set=train_set if views is None else views.dataset,
        val_set=val_set,
        config=config,
        batch_loss=cross_entropy,
        out=out,
        device=device,
        sampler=None if views is None else views.sampler,
        session=session,
    )


def _cached_dataset(config: DistillConfig, reader: StoreReader) -> LabeledDataset:
    recorded = reader.metadata.dataset or {}
    spec = config.dataset or recorded.get("spec")
    split = config.split or recorded.get("split") or "train"
    if spec is None:
        raise StoreMismatchError(
            f"{reader.where} records no dataset; pass --dataset SPEC (and --split) to say which "
            "one it belongs to"
        )
    dataset = build_dataset(spec, split=split)
    check_store_matches(reader, dataset)
    return dataset


def distill(config: DistillConfig, *, reader: StoreReader | None = None) -> RunResult:
    """Train ``config.student`` on the KD loss against cached (or live) teacher logits.

    ``reader`` is ``config.cache`` already opened with
    :func:`~kdcache.store.read.reader.open_store`:
    pass it to share one decoded store across many runs (as :func:`kdcache.train.sweep.run_sweep`
    does).
    Under torchrun every rank runs this with the same config (DistributedDataParallel).
    """
    with rank_session(config.device) as session:
        return _distill(config, session, reader=reader)


def _distill(
    config: DistillConfig, session: RankSession, *, reader: StoreReader | None
) -> RunResult:
    if reader is not None and config.cache is None:
        raise ConfigError(
            "an open store was passed to distill() but config.cache is None; set cache to its path"
        )
    device = session.device
    loss_fn = build_loss(
        config.loss,
        temperature=config.temperature,
        alpha=config.alpha,
        gamma=config.gamma,
        top_k=config.top_k,
    )
    resolved: dict = {
        "command": "distill",
        "device": str(device),
        "kdcache_version": __version__,
        "ranks": session.info.world_size,  # --batch-size is per rank
    }
    attach: Attach | None = None
    teacher_step: Callable[[DeviceBatch], TeacherInput]
    if config.cache is not None:
        reader = (
            reader
            if reader is not None
            else open_store(config.cache, memory_budget=config.cache_memory)
        )
        train_set = _cached_dataset(config, reader)
        rows = transfer_rows(config, train_set)
        feed = reader.feed
        # Ranks on one machine share one decoded table instead of one copy each.
        feed.load(shared=session.info.local_world_size > 1)
        # In memory any order is fast, so keep the seeded shuffle (the online run's order too);
        # a chunked feed must dictate the order for each chunk to be decoded once per epoch.
        if rows is not None:
            sampler: Sampler[int] | None = TransferSampler(rows, seed=config.seed, feed=feed)
        else:
            sampler = (
                feed.sampler(
                    seed=config.seed, rank=session.info.rank, world_size=session.info.world_size
                )
                if feed.mode == "chunked"
                else None
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
        resolved.update(
            dataset=train_set.spec,
            split=train_set.split,
            store=reader.metadata.to_dict(),
            feed={"mode": feed.mode, "memory_budget": feed.memory_budget},
        )

        def attach(indices: torch.Tensor) -> TeacherInput:
            # Gathered on the host and copied with the batch's images, one batch ahead; a
            # topk:K store's rows stay sparse (no dense (B, C) tensor): the loss softens them.
            return feed.read(indices if views is None else views.rows(indices))

        def teacher_step(batch: DeviceBatch) -> TeacherInput:
            assert batch.teacher is not None
            return batch.teacher
    else:
        assert config.teacher is not None and config.dataset is not None
        train_set = build_dataset(config.dataset, split=config.split or "train")
        rows = transfer_rows(config, train_set)
        sampler = None if rows is None else TransferSampler(rows, seed=config.seed)
        views = drawn_views(
            train_set,
            augment=config.augment,
            augment_seed=config.augment_seed,
            views=config.views,
            epochs=config.epochs,
            seed=config.seed,
            student_augment=config.student_augment,
        )
        teacher, teacher_forward = prepare_model(
            build_model(
                config.teacher,
                num_classes=train_set.num_classes,
                in_channels=train_set.in_channels,
            ),
            device=device,
            channels_last=config.channels_last,
            compile=False,  # compiled below, after eval mode and frozen weights
        )
        if config.weights is not None:
            load_weights(teacher, config.weights, spec=config.teacher)
            resolved["teacher_weights_sha256"] = weights_sha256(config.weights)
        teacher.eval().requires_grad_(False)
        if config.compile:
            teacher_forward = torch.compile(teacher)  # type: ignore[assignment]
        resolved.update(dataset=train_set.spec, split=train_set.split)

        @torch.no_grad()
        def teacher_step(batch: DeviceBatch) -> TeacherInput:
            with autocast(device, config.amp):
                return teacher_forward(batch.inputs).float()

    inputs = resolve_inputs(config.inputs, train_set, device, views=views is not None)
    resolved["inputs"] = inputs
    train_set = train_set.with_inputs(inputs)
    # An unlabeled transfer set (unlabeled:SPEC) is validated on SPEC's labelled held-out split.
    val_set = build_dataset(labeled_spec(train_set.spec), split=held_out_split(train_set.split))
    val_set = val_set.with_inputs(inputs)
    resolved["transfer"] = describe_transfer(rows, train_set)
    out = Path(config.out)
    session.refuse_unsharded(rows is not None, "a transfer set (--indices, --exclude-classes)")
    session.refuse_unsharded(views is not None, "views (--augment or a store with views)")
    if views is not None:
        if rows is not None:
            raise ConfigError(
                "a transfer set (--indices, --exclude-classes) cannot be combined with views "
                "(--augment or a store with views) yet; distill on every sample, or dump a store "
                "of the transfer set"
            )
        sampler = views.sampler
        resolved["views"] = views.dataset.views
        resolved["view_sampler"] = views.drawn_by
    session.on_main(
        lambda: config.save(
            prepare_output_dir(out, overwrite=config.overwrite) / "config.json", **resolved
        )
    )

    def kd_loss(logits: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
        rows = batch.indices if views is None else views.rows(batch.indices)
        loss = total_loss(loss_fn(logits, teacher_step(batch), batch.labels))
        mixed = None if views is None else views.mixed_hard_loss(logits, batch.labels, rows)
        # Every loss is alpha * soft + (1 - alpha) * CE: mix the CE term's labels like the input.
        return loss if mixed is None else loss + (1 - config.alpha) * mixed

    result = fit(
        model_spec=config.student,
        train_set=train_set if views is None else views.dataset,
        val_set=val_set,
        config=config,
        batch_loss=kd_loss,
        out=out,
        device=device,
        sampler=sampler,
        attach=attach,
        session=session,
    )
    if not session.is_main:
        return result
    _plot_final_distributions(
        out,
        config=config,
        dataset=train_set if views is None else views.dataset,
        reader=reader,
        teacher_step=teacher_step,
        device=device,
    )
    return result


def _plot_final_distributions(
    out: Path,
    *,
    config: DistillConfig,
    dataset: LabeledDataset | ViewDataset,
    reader: StoreReader | None,
    teacher_step: Callable[[DeviceBatch], TeacherInput],
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
        classes, first = np.unique(dataset.labels[labelled], return_index=True)
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
        if reader is not None:
            teacher = reader.read_dense(indices, temperature=config.temperature)
        else:
            batch = DeviceBatch(inputs, torch.tensor(labels, device=device), indices)
            online = teacher_step(batch)
            assert isinstance(online, torch.Tensor)
            teacher = online.cpu()
    plot_distributions(
        teacher,
        student_logits,
        labels,
        out / "distributions.png",
        temperature=config.temperature,
        sample_ids=samples.tolist(),
    )
