"""Train a model with cross-entropy, or distill a student from a cached store or a live teacher.

Both share one loop (:func:`fit`): seeded initialisation and shuffling, Adam, evaluation on the
held-out split after every epoch, and the same outputs in the run folder: ``best.pt``,
``last.pt``, ``metrics.jsonl`` and ``config.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from kdcache._version import __version__
from kdcache.config import DistillConfig, LoopConfig, TrainConfig
from kdcache.datasets import (
    LabeledDataset,
    build_dataset,
    compare_fingerprints,
    dataset_fingerprint,
)
from kdcache.device_input import Attach, DeviceBatch, InputPipeline, resolve_inputs
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.logits.losses import TeacherLogits, build_loss, total_loss
from kdcache.models import build_model, load_weights, weights_sha256
from kdcache.plots import plot_curves, plot_distributions
from kdcache.runtime import (
    atomic_torch_save,
    autocast,
    prepare_model,
    prepare_output_dir,
    resolve_device,
)
from kdcache.store.reader import StoreReader, open_store

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
) -> tuple[float, float]:
    """Accuracy in percent and mean cross-entropy of ``model`` on ``dataset``.

    ``dataset`` comes in the form the run loads (:meth:`LabeledDataset.with_inputs`).
    """
    model.eval()
    pipeline = InputPipeline(dataset, device=device, channels_last=channels_last)
    loader = pipeline.loader(batch_size=batch_size, num_workers=0, shuffle=False)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in pipeline.batches(loader):
        with autocast(device, amp):
            logits = model(batch.inputs)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum")
        correct += (logits.argmax(dim=1) == batch.labels).sum()
    return 100.0 * correct.item() / len(dataset), loss_sum.item() / len(dataset)


def _checkpoint(
    model: nn.Module, *, spec: str, dataset: LabeledDataset, epoch: int, val_acc: float
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
    train_set: LabeledDataset,
    val_set: LabeledDataset,
    config: LoopConfig,
    batch_loss: BatchLoss,
    out: Path,
    device: torch.device,
    sampler: Sampler[int] | None = None,
    attach: Attach | None = None,
) -> RunResult:
    """The training loop shared by :func:`train` and :func:`distill`.

    ``train_set`` and ``val_set`` come in the form the run loads; ``sampler`` replaces the
    seeded shuffle, e.g. with a chunked logit feed's order; ``attach`` looks up what rides along
    with each batch to the device (cached teacher logits). The forward pass runs under
    ``config.amp`` autocast; the loss is computed in float32 outside it.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model, step_model = prepare_model(
        build_model(
            model_spec, num_classes=train_set.num_classes, in_channels=train_set.in_channels
        ),
        device=device,
        channels_last=config.channels_last,
        compile=config.compile,
    )
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
    metrics_path.write_text("")
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        # Summed on the device: reading the loss every step would stall the GPU's queue.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for batch in tqdm(
            pipeline.batches(loader, attach=attach),
            total=len(loader),
            desc=f"epoch {epoch}/{config.epochs}",
            leave=False,
            disable=None,
        ):
            with autocast(device, config.amp):
                logits = step_model(batch.inputs)
            loss = batch_loss(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * batch.labels.size(0)
            seen += batch.labels.size(0)
        train_loss = loss_sum.item() / seen  # waits for the epoch's last step
        train_time = time.perf_counter() - epoch_started
        val_acc, val_loss = evaluate(
            model,
            val_set,
            batch_size=config.batch_size,
            device=device,
            amp=config.amp,
            channels_last=config.channels_last,
        )
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "train_time_s": round(train_time, 4),
        }
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
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
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
    plot_curves(metrics_path, out / "curves.png", title=f"{model_spec}: {out.resolve().name}")
    return result


def train(config: TrainConfig) -> RunResult:
    """Plain cross-entropy training (the teacher, or the CE-only student baseline)."""
    device = resolve_device(config.device)
    train_set = build_dataset(config.dataset, split=config.split)
    inputs = resolve_inputs(config.inputs, train_set, device)
    train_set = train_set.with_inputs(inputs)
    val_set = build_dataset(config.dataset, split=held_out_split(config.split)).with_inputs(inputs)
    out = prepare_output_dir(config.out, overwrite=config.overwrite)
    config.save(
        out / "config.json",
        command="train",
        device=str(device),
        inputs=inputs,
        kdcache_version=__version__,
    )

    def cross_entropy(logits: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
        return F.cross_entropy(logits, batch.labels)

    return fit(
        model_spec=config.model,
        train_set=train_set,
        val_set=val_set,
        config=config,
        batch_loss=cross_entropy,
        out=out,
        device=device,
    )


def check_store_matches(reader: StoreReader, dataset: LabeledDataset) -> None:
    """Refuse a store that was not dumped from ``dataset`` (size, classes, fingerprint)."""
    where = reader.where
    if reader.num_samples != len(dataset):
        raise StoreMismatchError(
            f"{where} holds {reader.num_samples} samples but dataset {dataset.spec!r} ({dataset.split}) "
            f"has {len(dataset)}; use the dataset and split the store was dumped from"
        )
    if reader.num_classes != dataset.num_classes:
        raise StoreMismatchError(
            f"{where} holds {reader.num_classes} classes but dataset {dataset.spec!r} has "
            f"{dataset.num_classes}; use the dataset the store was dumped from"
        )
    recorded = (reader.metadata.dataset or {}).get("fingerprint")
    if recorded:
        differences = compare_fingerprints(recorded, dataset_fingerprint(dataset))
        if differences:
            raise StoreMismatchError(
                f"{where} was not dumped from dataset {dataset.spec!r} ({dataset.split}): "
                + "; ".join(differences)
                + "; use the dataset and split the store was dumped from"
            )


def _cached_dataset(config: DistillConfig, reader: StoreReader) -> LabeledDataset:
    recorded = reader.metadata.dataset or {}
    spec = config.dataset or recorded.get("spec")
    split = config.split or recorded.get("split") or "train"
    if spec is None:
        raise StoreMismatchError(
            f"{reader.where} records no dataset; pass --dataset SPEC (and --split) to say which one it belongs to"
        )
    dataset = build_dataset(spec, split=split)
    check_store_matches(reader, dataset)
    return dataset


def distill(config: DistillConfig, *, reader: StoreReader | None = None) -> RunResult:
    """Train ``config.student`` on the KD loss against cached (or live) teacher logits.

    ``reader`` is ``config.cache`` already opened with :func:`~kdcache.store.reader.open_store`: pass
    it to share one decoded store across many runs (as :func:`kdcache.train.sweep.run_sweep` does).
    """
    if reader is not None and config.cache is None:
        raise ConfigError(
            "an open store was passed to distill() but config.cache is None; set cache to its path"
        )
    device = resolve_device(config.device)
    loss_fn = build_loss(
        config.loss,
        temperature=config.temperature,
        alpha=config.alpha,
        gamma=config.gamma,
        top_k=config.top_k,
    )
    resolved: dict = {"command": "distill", "device": str(device), "kdcache_version": __version__}
    attach: Attach | None = None
    teacher_step: Callable[[DeviceBatch], TeacherLogits]
    if config.cache is not None:
        reader = (
            reader
            if reader is not None
            else open_store(config.cache, memory_budget=config.cache_memory)
        )
        train_set = _cached_dataset(config, reader)
        feed = reader.feed
        feed.load()
        # In memory any order is fast, so keep the seeded shuffle (the online run's order too);
        # a chunked feed must dictate the order for each chunk to be decoded once per epoch.
        sampler = feed.sampler(seed=config.seed) if feed.mode == "chunked" else None
        resolved.update(
            dataset=train_set.spec,
            split=train_set.split,
            store=reader.metadata.to_dict(),
            feed={"mode": feed.mode, "memory_budget": feed.memory_budget},
        )
        store = reader

        def attach(indices: torch.Tensor) -> TeacherLogits:
            # Gathered on the host and copied with the batch's images, one batch ahead.
            if store.encoding.is_sparse:
                # A topk:K store stays sparse: no dense (B, C) teacher tensor on the host.
                return store.read_sparse(indices)
            return feed.read(indices, temperature=config.temperature)

        def teacher_step(batch: DeviceBatch) -> TeacherLogits:
            assert batch.teacher is not None
            return batch.teacher
    else:
        assert config.teacher is not None and config.dataset is not None
        sampler = None
        train_set = build_dataset(config.dataset, split=config.split or "train")
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
        def teacher_step(batch: DeviceBatch) -> TeacherLogits:
            with autocast(device, config.amp):
                return teacher_forward(batch.inputs).float()

    inputs = resolve_inputs(config.inputs, train_set, device)
    resolved["inputs"] = inputs
    train_set = train_set.with_inputs(inputs)
    val_set = build_dataset(train_set.spec, split=held_out_split(train_set.split))
    val_set = val_set.with_inputs(inputs)
    out = prepare_output_dir(config.out, overwrite=config.overwrite)
    config.save(out / "config.json", **resolved)

    def kd_loss(logits: torch.Tensor, batch: DeviceBatch) -> torch.Tensor:
        return total_loss(loss_fn(logits, teacher_step(batch), batch.labels))

    result = fit(
        model_spec=config.student,
        train_set=train_set,
        val_set=val_set,
        config=config,
        batch_loss=kd_loss,
        out=out,
        device=device,
        sampler=sampler,
        attach=attach,
    )
    _plot_final_distributions(
        out,
        config=config,
        dataset=train_set,
        reader=reader,
        teacher_step=teacher_step,
        device=device,
    )
    return result


def _plot_final_distributions(
    out: Path,
    *,
    config: DistillConfig,
    dataset: LabeledDataset,
    reader: StoreReader | None,
    teacher_step: Callable[[DeviceBatch], TeacherLogits],
    device: torch.device,
    num_samples: int = 4,
) -> None:
    """Write ``distributions.png``: teacher vs final student on the first sample of a few classes.

    The teacher's side comes from the store when there is one (dense, at the run's temperature),
    else from the live teacher.
    """
    classes, first = np.unique(dataset.labels, return_index=True)
    picked = np.linspace(0, len(classes) - 1, min(num_samples, len(classes))).round().astype(int)
    indices = torch.from_numpy(np.sort(first[picked]))
    inputs = torch.stack([dataset.float_input(int(i)) for i in indices]).to(device)
    labels = [dataset[int(i)][1] for i in indices]
    student = build_model(
        config.student, num_classes=dataset.num_classes, in_channels=dataset.in_channels
    )
    load_weights(student, out / "last.pt", spec=config.student)
    student.to(device).eval()
    with torch.no_grad():
        student_logits = student(inputs).cpu()
        if reader is not None:
            teacher = reader.read(indices, temperature=config.temperature)
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
        sample_ids=indices.tolist(),
    )
