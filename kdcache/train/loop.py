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
from kdcache.distributed import RankSession, rank_session
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.logits.losses import TeacherLogits, build_loss, total_loss
from kdcache.models import build_model, load_weights, weights_sha256
from kdcache.plots import plot_curves, plot_distributions
from kdcache.runtime import atomic_torch_save, make_loader, prepare_output_dir
from kdcache.store.reader import StoreReader, open_store

log = logging.getLogger("kdcache")

#: Computes the loss of one batch from (student logits, inputs, labels, sample indices).
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    session: RankSession | None = None,
) -> tuple[float, float]:
    """Accuracy in percent and mean cross-entropy of ``model`` on ``dataset``.

    Under torchrun each rank scores its own slice of ``dataset`` and the sums are added up.
    """
    model.eval()
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        num_workers=0,
        device=device,
        shuffle=False,
        sampler=None if session is None else session.shard_sampler(len(dataset)),
    )
    correct, loss_sum = 0.0, 0.0
    for inputs, labels, _ in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    if session is not None:
        correct, loss_sum = session.all_sum(correct, loss_sum)
    return 100.0 * correct / len(dataset), loss_sum / len(dataset)


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
    session: RankSession | None = None,
) -> RunResult:
    """The training loop shared by :func:`train` and :func:`distill`.

    ``sampler`` replaces the seeded shuffle, e.g. with a chunked logit feed's order. Under
    torchrun (``session``) the model trains in DistributedDataParallel on this rank's share of
    each epoch, and only rank 0 writes the run folder.
    """
    started = time.perf_counter()
    session = session or RankSession.single(device)
    torch.manual_seed(config.seed)
    model = build_model(
        model_spec, num_classes=train_set.num_classes, in_channels=train_set.in_channels
    ).to(device)
    trained = session.wrap_model(model)
    if sampler is None:
        sampler = session.epoch_sampler(len(train_set), seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = make_loader(
        train_set,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        device=device,
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
        loss_sum, seen = 0.0, 0.0
        for inputs, labels, indices in session.joined(
            trained, tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None)
        ):
            inputs = inputs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = batch_loss(trained(inputs), inputs, labels, indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.size(0)
            seen += labels.size(0)
        loss_sum, seen = session.all_sum(loss_sum, seen)
        session.sync_buffers(model)  # every rank scores, and rank 0 saves, the same model
        train_time = time.perf_counter() - epoch_started
        val_acc, val_loss = evaluate(
            model, val_set, batch_size=config.batch_size, device=device, session=session
        )
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
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


def train(config: TrainConfig) -> RunResult:
    """Plain cross-entropy training (the teacher, or the CE-only student baseline)."""
    with rank_session(config.device) as session:
        return _train(config, session)


def _train(config: TrainConfig, session: RankSession) -> RunResult:
    device = session.device
    train_set = build_dataset(config.dataset, split=config.split)
    val_set = build_dataset(config.dataset, split=held_out_split(config.split))
    out = Path(config.out)
    session.on_main(
        lambda: config.save(
            prepare_output_dir(out, overwrite=config.overwrite) / "config.json",
            command="train",
            device=str(device),
            kdcache_version=__version__,
            ranks=session.info.world_size,
        )
    )

    def cross_entropy(
        logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    return fit(
        model_spec=config.model,
        train_set=train_set,
        val_set=val_set,
        config=config,
        batch_loss=cross_entropy,
        out=out,
        device=device,
        session=session,
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
    if config.cache is not None:
        reader = (
            reader
            if reader is not None
            else open_store(config.cache, memory_budget=config.cache_memory)
        )
        train_set = _cached_dataset(config, reader)
        feed = reader.feed
        # Ranks on one machine share one decoded table instead of one copy each.
        feed.load(shared=session.info.local_world_size > 1)
        # In memory any order is fast, so keep the seeded shuffle (the online run's order too);
        # a chunked feed must dictate the order for each chunk to be decoded once per epoch.
        sampler = (
            feed.sampler(
                seed=config.seed, rank=session.info.rank, world_size=session.info.world_size
            )
            if feed.mode == "chunked"
            else None
        )
        resolved.update(
            dataset=train_set.spec,
            split=train_set.split,
            store=reader.metadata.to_dict(),
            feed={"mode": feed.mode, "memory_budget": feed.memory_budget},
        )

        def teacher_logits(inputs: torch.Tensor, indices: torch.Tensor) -> TeacherLogits:
            if reader.encoding.is_sparse:
                # A topk:K store stays sparse: no dense (B, C) teacher tensor on the host.
                return reader.read_sparse(indices).to(device)
            return feed.to_device(indices, device, temperature=config.temperature)
    else:
        assert config.teacher is not None and config.dataset is not None
        sampler = None
        train_set = build_dataset(config.dataset, split=config.split or "train")
        teacher = build_model(
            config.teacher, num_classes=train_set.num_classes, in_channels=train_set.in_channels
        )
        if config.weights is not None:
            load_weights(teacher, config.weights, spec=config.teacher)
            resolved["teacher_weights_sha256"] = weights_sha256(config.weights)
        teacher.to(device).eval().requires_grad_(False)
        resolved.update(dataset=train_set.spec, split=train_set.split)

        @torch.no_grad()
        def teacher_logits(inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            return teacher(inputs).float()

    val_set = build_dataset(train_set.spec, split=held_out_split(train_set.split))
    out = Path(config.out)
    session.on_main(
        lambda: config.save(
            prepare_output_dir(out, overwrite=config.overwrite) / "config.json", **resolved
        )
    )

    def kd_loss(
        logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        return total_loss(loss_fn(logits, teacher_logits(inputs, indices), labels))

    result = fit(
        model_spec=config.student,
        train_set=train_set,
        val_set=val_set,
        config=config,
        batch_loss=kd_loss,
        out=out,
        device=device,
        sampler=sampler,
        session=session,
    )
    if not session.is_main:
        return result
    _plot_final_distributions(
        out,
        config=config,
        dataset=train_set,
        reader=reader,
        teacher_logits=teacher_logits,
        device=device,
    )
    return result


def _plot_final_distributions(
    out: Path,
    *,
    config: DistillConfig,
    dataset: LabeledDataset,
    reader: StoreReader | None,
    teacher_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
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
    inputs = torch.stack([dataset[int(i)][0] for i in indices]).to(device)
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
            teacher = teacher_logits(inputs, indices).cpu()
    plot_distributions(
        teacher,
        student_logits,
        labels,
        out / "distributions.png",
        temperature=config.temperature,
        sample_ids=indices.tolist(),
    )
