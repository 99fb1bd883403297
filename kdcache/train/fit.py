"""The training loop shared by :func:`~kdcache.train.loop.train` and
:func:`~kdcache.train.loop.distill`: :func:`fit` and the held-out :func:`evaluate`.

Seeded initialisation and shuffling, Adam, evaluation on the held-out split after every epoch,
and the same outputs in the run folder: ``best.pt``, ``last.pt``, ``metrics.jsonl`` and
``curves.png``.
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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from kdcache._version import __version__
from kdcache.config import LoopConfig
from kdcache.data.datasets import LabeledDataset
from kdcache.data.device_input import Attach, DeviceBatch, InputPipeline
from kdcache.distributed import RankSession
from kdcache.errors import ConfigError
from kdcache.models import build_model, check_input_fits
from kdcache.plots.figures import plot_curves
from kdcache.run_folder import atomic_torch_save
from kdcache.runtime import autocast, prepare_model

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
    """The training loop shared by :func:`~kdcache.train.loop.train` and
    :func:`~kdcache.train.loop.distill`.

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
