"""Train a model with cross-entropy, or distill a student from a cached store or a live teacher.

Both share one loop (:func:`fit`): seeded initialisation and shuffling, Adam, evaluation on the
held-out split after every epoch, and the same outputs in the run folder: ``best.pt``,
``last.pt``, ``metrics.jsonl`` and ``config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from kdcache._version import __version__
from kdcache.config import DistillConfig, LoopConfig, TrainConfig
from kdcache.datasets import LabeledDataset, build_dataset, labeled_spec
from kdcache.device_input import Attach, DeviceBatch, InputPipeline, resolve_inputs
from kdcache.distributed import RankSession, rank_session
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.logits.losses import build_loss, total_loss
from kdcache.logits.sparse import TeacherInput
from kdcache.models import build_model, check_input_fits, load_weights, weights_sha256
from kdcache.plots import plot_curves, plot_distributions
from kdcache.runtime import (
    atomic_torch_save,
    autocast,
    prepare_model,
    prepare_output_dir,
)
from kdcache.store.reader import StoreReader, open_store
from kdcache.train.pairing import check_store_matches
from kdcache.train.transfer import TransferSampler, describe_transfer, transfer_rows
from kdcache.train.views import cached_views, drawn_views, first_rows

if TYPE_CHECKING:
    from kdcache.augment.views import ViewDataset

log = logging.getLogger("kdcache")

#: Computes the loss of one batch from the student's float32 logits and the batch.
BatchLoss = Callable[[torch.Tensor, DeviceBatch], torch.Tensor]


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports: accuracies in percent, wall time in seconds."""

    out: str
    best_val_acc: float
    final_val_acc: float
    best_epoch: int
    epochs: int
    wall_time_s: float


def held_out_split(split: str) -> str:
    return "test" if split == "train" else "train"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: LabeledDataset,
    *,
    batch_size: int,
    device: torch.device,
    amp: str | None = None,
    channels_last: bool = False,
    session: RankSession | None = None,
) -> tuple[float, float]:
    """Accuracy in percent and mean cross-entropy of ``model`` on ``dataset``.

    ``dataset`` comes in the form the run loads (:meth:`LabeledDataset.with_inputs`). Under
    torchrun each rank scores its own slice of ``dataset`` and the sums are added up.
    """
    model.eval()
    pipeline = InputPipeline(dataset, device=device, channels_last=channels_last)
    loader = pipeline.loader(
        batch_size=batch_size,
        num_workers=0,
        shuffle=False,
        sampler=None if session is None else session.shard_sampler(len(dataset)),
    )
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in pipeline.batches(loader):
        with autocast(device, amp):
            logits = model(batch.inputs)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum")
        correct += (logits.argmax(dim=1) == batch.labels).sum()
    right, total = float(correct.item()), float(loss_sum.item())
    if session is not None:
        right, total = session.all_sum(right, total)
    return 100.0 * right / len(dataset), total / len(dataset)


def _checkpoint(
    model: nn.Module,
    *,
    spec: str,
    dataset: LabeledDataset | ViewDataset,
    epoch: int,
    val_acc: float,
) -> dict:
    return {
        "state_dict": model.state_dict(),
        "model": spec,
        "num_classes": dataset.num_classes,
        "in_channels": dataset.in_channels,
        "epoch": epoch,
        "val_acc": val_acc,
        "kdcache_version": __version__,
    }


def fit(
    *,
    model_spec: str,
    train_set: LabeledDataset | ViewDataset,
    val_set: LabeledDataset,
    config: LoopConfig,
    batch_loss: BatchLoss,
    out: Path,
    device: torch.device,
    sampler: Sampler[int] | None = None,
    attach: Attach | None = None,
    session: RankSession | None = None,
) -> RunResult:
    """The training loop shared by :func:`train` and :func:`distill`.

    ``train_set`` and ``val_set`` come in the form the run loads; ``sampler`` replaces the
    seeded shuffle, e.g. with a chunked logit feed's order; ``attach`` looks up what rides along
    with each batch to the device (cached teacher logits). The forward pass runs under
    ``config.amp`` autocast; the loss is computed in float32 outside it.
    Under torchrun (``session``) the model trains in DistributedDataParallel on this rank's
    share of each epoch, and only rank 0 writes the run folder.
    """
    started = time.perf_counter()
    session = session or RankSession.single(device)
    torch.manual_seed(config.seed)
    model, step_model = prepare_model(
        build_model(
            model_spec, num_classes=train_set.num_classes, in_channels=train_set.in_channels
        ),
        device=device,
        channels_last=config.channels_last,
        compile=config.compile and not session.is_distributed,
    )
    check_input_fits(model, tuple(val_set.float_input(0).shape), spec=model_spec)
    trained = session.wrap_model(model)
    if session.is_distributed:
        step_model = cast(nn.Module, torch.compile(trained)) if config.compile else trained
    if sampler is None:
        sampler = session.epoch_sampler(len(train_set), seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    pipeline = InputPipeline(train_set, device=device, channels_last=config.channels_last)
    loader = pipeline.loader(
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        shuffle=True,
        seed=config.seed,
        sampler=sampler,
    )
    best_acc, best_epoch, val_acc = -1.0, 0, 0.0
    metrics_path = out / "metrics.jsonl"
    if session.is_main:
        metrics_path.write_text("")
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        # Summed on the device: reading the loss every step would stall the GPU's queue.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        batches = tqdm(
            pipeline.batches(loader, attach=attach),
            total=len(loader),
            desc=f"epoch {epoch}/{config.epochs}",
            leave=False,
            disable=None,
        )
        for batch in session.joined(trained, batches):
            with autocast(device, config.amp):
                logits = step_model(batch.inputs)
            loss = batch_loss(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * batch.labels.size(0)
            seen += batch.labels.size(0)
        # .item() waits for the epoch's last step
        summed, counted = session.all_sum(loss_sum.item(), seen)
        train_loss = summed / counted
        session.sync_buffers(model)  # every rank scores, and rank 0 saves, the same model
        train_time = time.perf_counter() - epoch_started
        val_acc, val_loss = evaluate(
            model,
            val_set,
            batch_size=config.batch_size,
            device=device,
            amp=config.amp,
            channels_last=config.channels_last,
            session=session,
        )
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            # NaN weights would otherwise train on silently and exit 0 with a useless model.
            raise ConfigError(
                f"training diverged in epoch {epoch} (train loss {train_loss:.4g}, validation "
                f"loss {val_loss:.4g}); lower --lr, or check --temperature and --gamma"
            )
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "train_time_s": round(train_time, 4),
        }
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch
        if not session.is_main:
            continue  # val_acc is the same on every rank, so every rank returns the same result
        with metrics_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d/%d  train_loss %.4f  val_acc %.2f%%  (%.1fs)",
            epoch,
            config.epochs,
            record["train_loss"],
            val_acc,
            train_time,
        )
        checkpoint = _checkpoint(
            model, spec=model_spec, dataset=train_set, epoch=epoch, val_acc=val_acc
        )
        if improved:
            atomic_torch_save(checkpoint, out / "best.pt")
        atomic_torch_save(checkpoint, out / "last.pt")
    result = RunResult(
        out=str(out),
        best_val_acc=best_acc,
        final_val_acc=val_acc,
        best_epoch=best_epoch,
        epochs=config.epochs,
        wall_time_s=time.perf_counter() - started,
    )
    if session.is_main:
        plot_curves(metrics_path, out / "curves.png", title=f"{model_spec}: {out.resolve().name}")
    return result


def _input_form(requested: str, views: bool, dataset: LabeledDataset, device: torch.device) -> str:
    """The form images reach the device in (kdcache.device_input): float32 whenever views are
    drawn, since augmentation works on float32 images."""
    if not views:
        return resolve_inputs(requested, dataset, device)
    if requested not in ("auto", "float32"):
        raise ConfigError(
            f"--inputs {requested} cannot be combined with augmentation: views are cut from "
            "float32 images; drop --inputs (or pass --inputs float32)"
        )
    return resolve_inputs("float32", dataset, device)


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
    inputs = _input_form(config.inputs, config.augment is not None, train_set, device)
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

    ``reader`` is ``config.cache`` already opened with :func:`~kdcache.store.reader.open_store`:
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

    inputs = _input_form(config.inputs, views is not None, train_set, device)
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
