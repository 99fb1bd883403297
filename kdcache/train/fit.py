"""The one training loop, for every task and teacher source: :func:`fit`.

Seeded shuffling, Adam or AdamW under a learning-rate schedule stepped per step
(:mod:`kdcache.train.optim`) with ``--max-grad-norm`` clipping, the forward pass under ``--amp``
autocast (fp16 with loss scaling), ``--compile``, evaluation on the held-out split after every
epoch, DistributedDataParallel under torchrun (each rank trains on its share of every epoch;
rank 0 writes), and the same run folder for every run: the task's ``best``/``last`` checkpoints,
``metrics.jsonl`` (each epoch's last learning rate among its entries, and its mean gradient norm
when clipping) and ``curves.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Sampler

from kdcache.config import LoopConfig
from kdcache.distributed import RankSession
from kdcache.errors import ConfigError
from kdcache.progress import progress
from kdcache.runtime import autocast, prepare_model
from kdcache.train.optim import build_optimizer, build_schedule
from kdcache.train.tasks import Task, describe_metrics
from kdcache.train.teachers import TeacherSource
from kdcache.wording import counted

log = logging.getLogger("kdcache")


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports: its held-out ``metric`` (``val_acc`` in percent for images,
    ``val_ppl`` for language models) at its best and final epochs, wall time in seconds."""

    out: str
    metric: str
    best: float
    final: float
    best_epoch: int
    epochs: int
    wall_time_s: float

    def summary(self) -> str:
        unit = "%" if self.metric == "val_acc" else ""
        digits = 2 if self.metric == "val_acc" else 3
        return (
            f"best {self.metric} {self.best:.{digits}f}{unit} (epoch {self.best_epoch}), final "
            f"{self.final:.{digits}f}{unit}, {counted(self.epochs, 'epoch')} in "
            f"{self.wall_time_s:.1f}s -> {self.out}"
        )


def held_out_split(split: str) -> str:
    return "test" if split == "train" else "train"


def fit(
    *,
    task: Task,
    train_set: Any,
    val_set: Any,
    config: LoopConfig,
    out: Path,
    session: RankSession,
    teacher: TeacherSource | None = None,
    sampler: Sampler[int] | None = None,
) -> RunResult:
    """Train ``task.model`` on ``train_set`` with ``task``'s loss against ``teacher``'s targets.

    ``train_set`` and ``val_set`` come in the form the task loads; ``sampler`` replaces the
    seeded shuffle (e.g. with a chunked logit feed's order). The forward pass runs under
    ``config.amp`` autocast; the loss is computed in float32 outside it.
    """
    started = time.perf_counter()
    device = session.device
    model, step_model = prepare_model(
        task.model,
        device=device,
        channels_last=config.channels_last,
        compile=config.compile and not session.is_distributed,
    )
    trained = session.wrap_model(model)
    if session.is_distributed:
        step_model = cast(nn.Module, torch.compile(trained)) if config.compile else trained
    if sampler is None:
        sampler = session.epoch_sampler(len(train_set), seed=config.seed)
    optimizer = build_optimizer(model, config)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    batches, num_batches = task.batches(
        train_set,
        config=config,
        device=device,
        sampler=sampler,
        attach=None if teacher is None else teacher.attach,
    )
    # Ranks may differ by a batch per epoch: all follow the longest's curve, the others
    # catching up at each epoch's end, so that every rank's step n has the same learning rate.
    steps_per_epoch = max(session.all_gather(num_batches))
    schedule = build_schedule(optimizer, config, steps_per_epoch=steps_per_epoch)
    best: float | None = None
    best_epoch, score = 0, math.nan
    metrics_path = out / "metrics.jsonl"
    if session.is_main:
        metrics_path.write_text("")
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        # Summed on the device: reading the loss every step would stall the GPU's queue.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        # The norms of the steps taken: fp16's loss scaling skips a step whose norm is inf.
        grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        grad_norm_steps = torch.zeros((), dtype=torch.int64, device=device)
        seen = steps = 0
        lr = optimizer.param_groups[0]["lr"]
        shown = progress(
            batches,
            total=num_batches,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
        )
        for batch in session.joined(trained, shown):
            with autocast(device, config.amp):
                logits = task.forward(step_model, batch)
            targets = None if teacher is None else teacher.targets(batch)
            loss = task.loss(logits.float(), batch, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.max_grad_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                norm = nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                grad_norm_sum += torch.where(norm.isfinite(), norm, 0.0)
                grad_norm_steps += norm.isfinite()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            schedule.step()
            steps += 1
            weight = task.weight(batch)
            loss_sum += loss.detach() * weight
            seen += weight
        for _ in range(steps, steps_per_epoch):
            lr = optimizer.param_groups[0]["lr"]
            schedule.step()
        # .item() waits for the epoch's last step
        summed, counted = session.all_sum(loss_sum.item(), seen)
        train_loss = summed / counted
        session.sync_buffers(model)  # every rank scores, and rank 0 saves, the same model
        train_time = time.perf_counter() - epoch_started
        metrics = task.evaluate(val_set, config=config, device=device, session=session)
        if not (math.isfinite(train_loss) and math.isfinite(metrics["val_loss"])):
            # NaN weights would otherwise train on silently and exit 0 with a useless model.
            raise ConfigError(
                f"training diverged in epoch {epoch} (train loss {train_loss:.4g}, validation "
                f"loss {metrics['val_loss']:.4g}); lower --lr, or check --temperature and the "
                "loss's options"
            )
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": lr,
            **(
                {"grad_norm": grad_norm_sum.item() / max(1, grad_norm_steps.item())}
                if config.max_grad_norm
                else {}
            ),
            **metrics,
            "train_time_s": round(train_time, 4),
            **task.epoch_extras(int(counted), train_time),
        }
        score = metrics[task.metric]
        improved = task.improves(score, best)
        if improved:
            best, best_epoch = score, epoch
        if not session.is_main:
            continue  # the metrics are the same on every rank, so is the result
        with metrics_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d/%d  train_loss %.4f  %s  (%.1fs)",
            epoch,
            config.epochs,
            train_loss,
            describe_metrics(record, task.metric),
            train_time,
        )
        for name in ("best", "last") if improved else ("last",):
            task.save(out, name, epoch=epoch, score=score, train_set=train_set)
    if session.is_main:
        task.plot(metrics_path, out)
    assert best is not None
    return RunResult(
        out=str(out),
        metric=task.metric,
        best=best,
        final=score,
        best_epoch=best_epoch,
        epochs=config.epochs,
        wall_time_s=time.perf_counter() - started,
    )
