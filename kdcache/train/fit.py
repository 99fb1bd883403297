"""The one training loop, for every task and teacher source: :func:`fit`.

Seeded shuffling, Adam or AdamW under a learning-rate schedule stepped per step
(:mod:`kdcache.train.optim`) with ``--max-grad-norm`` clipping, the forward pass under ``--amp``
autocast (fp16 with loss scaling), ``--compile``, evaluation on the held-out split after every
epoch (and every ``--eval-every`` steps within epochs), DistributedDataParallel under torchrun
(each rank trains on its share of every epoch; rank 0 writes), and the same run folder for every
run: the task's ``best``/``last`` checkpoints, ``metrics.jsonl`` (one line per evaluation: the
run's step, the last learning rate, the epoch's mean training loss and gradient norm so far),
``curves.png`` and, until the run ends, ``resume.pt`` (``--resume``: :mod:`kdcache.train.resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.utils.data import Sampler

from kdcache.config import LoopConfig
from kdcache.distributed import RankSession
from kdcache.errors import ConfigError
from kdcache.progress import progress
from kdcache.runtime import autocast, prepare_model
from kdcache.temporaries import TemporaryFile
from kdcache.train.ema import WeightAverage
from kdcache.train.optim import build_optimizer, build_schedule
from kdcache.train.resume import (
    EpochStart,
    RankProgress,
    ResumePoint,
    load_resume_point,
    random_states,
    remove_resume_point,
    restore_random_states,
    save_resume_point,
    skip,
)
from kdcache.train.tasks import EpochBatches, Task, describe_metrics
from kdcache.train.teachers import TeacherSource
from kdcache.wording import counted

log = logging.getLogger("kdcache")
T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports: its held-out ``metric`` (``val_acc`` in percent for images,
    ``val_ppl`` for language models) at its best and final evaluations, wall time in seconds
    (a resumed run's includes its sessions before the last save).
    ``best_step`` is the optimisation step of the best evaluation (0 in results saved before
    runs recorded it), ``best_epoch`` the epoch it fell in."""

    out: str
    metric: str
    best: float
    final: float
    best_epoch: int
    epochs: int
    wall_time_s: float
    best_step: int = 0

    def summary(self) -> str:
        unit = "%" if self.metric == "val_acc" else ""
        digits = 2 if self.metric == "val_acc" else 3
        return (
            f"best {self.metric} {self.best:.{digits}f}{unit} (epoch {self.best_epoch}"
            f"{f', step {self.best_step}' if self.best_step else ''}), final "
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
    average = WeightAverage(model, decay=config.ema_decay) if config.ema_decay else None
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
    rank_batches = session.all_gather(num_batches)
    accumulated = config.grad_accum_steps
    rank_steps = [math.ceil(batches / accumulated) for batches in rank_batches]
    steps_per_epoch = max(rank_steps)
    # Steps whose batches every rank has: there the gradients are all-reduced once, with the
    # step's last batch; later, with each batch, as DDP's join expects of the ranks it shadows.
    shared_steps = min(rank_batches) // accumulated
    schedule = build_schedule(optimizer, config, steps_per_epoch=steps_per_epoch)
    evaluation = _Evaluations(
        task=task, val_set=val_set, config=config, session=session, out=out, train_set=train_set
    )
    state = _RunState(
        started=started,
        out=out,
        config=config,
        session=session,
        evaluation=evaluation,
        batches=batches,
        parts={
            "model": model,
            "optimizer": optimizer,
            "schedule": schedule,
            "scaler": scaler,
            **({} if average is None else {"ema": average}),
        },
        steps_per_epoch=steps_per_epoch,
    )
    for number in range(state.first_epoch(), config.epochs + 1):
        model.train()
        epoch, stream = state.begin_epoch(number, lr=optimizer.param_groups[0]["lr"])
        shown = progress(
            _windows(stream, accumulated),
            total=math.ceil(num_batches / accumulated),
            initial=epoch.steps,
            desc=f"epoch {number}/{config.epochs}",
            unit="step",
            leave=False,
        )
        for window in session.joined(trained, shown):
            optimizer.zero_grad(set_to_none=True)
            # Each batch's mean loss weighed by its share of the step's samples (tokens): the
            # step's gradient is that of the mean over all of them.
            weights = [task.weight(batch) for batch in window]
            total = sum(weights)
            tail = epoch.steps >= shared_steps
            summed = session.gradient_sum(model, batches=len(window)) if tail else None
            for position, (batch, weight) in enumerate(zip(window, weights, strict=True)):
                deferred = not tail and position < len(window) - 1
                if summed is not None:
                    summed.set_aside()
                with session.no_sync(trained) if deferred else contextlib.nullcontext():
                    with autocast(device, config.amp):
                        logits = _forward(task, step_model, batch)
                    targets = None if teacher is None else teacher.targets(batch)
                    loss = task.loss(logits.float(), batch, targets)
                    scaler.scale(loss * (weight / total)).backward()
                epoch.loss_sum += loss.detach() * weight
                epoch.seen += weight
            if summed is not None:
                summed.put_back()
            if config.max_grad_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                norm = nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                epoch.grad_norm_sum += torch.where(norm.isfinite(), norm, 0.0)
                epoch.grad_norm_steps += norm.isfinite()
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update(model)
            epoch.lr = optimizer.param_groups[0]["lr"]
            schedule.step()
            epoch.steps += 1
            # Within the epoch only where every rank still has batches: all must evaluate.
            if (
                config.eval_every
                and epoch.step % config.eval_every == 0
                and epoch.steps < min(rank_steps)
            ):
                # The evaluation's loaders draw from torch's generators: put them back, so the
                # rest of the epoch draws (dropout, augmentations) as it would have without it.
                with _random_state_kept(device), _evaluated(average, model, session, src=0):
                    evaluation.run(model, epoch, end_of_epoch=False)
                if config.resumable:
                    state.save(epoch, end_of_epoch=False)
                model.train()
        for _ in range(epoch.steps, steps_per_epoch):
            epoch.lr = optimizer.param_groups[0]["lr"]
            schedule.step()
        # The join gave every rank the longest rank's model (the last of them, as DDP picks
        # it); its optimizer state and weight average go with it.
        longest = max(range(len(rank_batches)), key=lambda rank: (rank_batches[rank], rank))
        if min(rank_batches) < max(rank_batches):
            session.align_optimizer(optimizer, scaler, src=longest)
        with _evaluated(average, model, session, src=longest):
            evaluation.run(model, epoch, end_of_epoch=True)
        if number < config.epochs and config.resumable:
            state.save(epoch, end_of_epoch=True)
    if session.is_main:
        task.plot(evaluation.metrics_path, out)
        remove_resume_point(out)
    assert evaluation.best is not None
    return RunResult(
        out=str(out),
        metric=task.metric,
        best=evaluation.best,
        final=evaluation.score,
        best_epoch=evaluation.best_epoch,
        epochs=config.epochs,
        wall_time_s=state.wall_s(),
        best_step=evaluation.best_step,
    )


@dataclass
class _RunState:
    """Where the run stands, saved at evaluations for ``--resume`` and taken up from there: see
    :mod:`kdcache.train.resume`."""

    #: When this session of the run began (``time.perf_counter``).
    started: float
    out: Path
    config: LoopConfig
    session: RankSession
    evaluation: _Evaluations
    batches: EpochBatches
    #: The student, optimizer, schedule and scaler, by their names in the file.
    parts: dict[str, Any]
    steps_per_epoch: int
    resumed: ResumePoint | None = None

    def wall_s(self) -> float:
        """Wall-clock seconds the run has taken, its sessions before a ``--resume`` included."""
        before = self.resumed.wall_s if self.resumed is not None else 0.0
        return before + time.perf_counter() - self.started

    def first_epoch(self) -> int:
        """The epoch to begin with: 1, or with ``--resume`` the saved run's, once its student,
        optimizer, schedule, scaler and evaluations are put back."""
        if not self.config.resume:
            if self.session.is_main:
                self.evaluation.metrics_path.write_text("")
            return 1
        self.resumed = load_resume_point(
            self.out,
            config=self.config,
            session=self.session,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.resumed.restore(self.parts)
        self.evaluation.resume_from(self.resumed)
        log.info(
            "resuming %s at epoch %d, step %d", self.out, self.resumed.epoch, self.resumed.step
        )
        return self.resumed.epoch

    def begin_epoch(self, number: int, *, lr: float) -> tuple[_Epoch, Iterator[Any]]:
        """Epoch ``number``'s account and its batches; the resumed epoch's in the order it had,
        past the batches trained on before the save."""
        device = self.session.device
        within = self.resumed if self.resumed and number == self.resumed.epoch else None
        if within is not None:
            self.batches.restore_order(within.rank.start.loader, after_first_epoch=number > 1)
            restore_random_states(within.rank.start.random, device)
        epoch = _Epoch(
            number=number,
            steps_per_epoch=self.steps_per_epoch,
            # Summed on the device: reading the loss every step would stall the GPU's queue.
            loss_sum=torch.zeros((), dtype=torch.float64, device=device),
            # The norms of the steps taken: fp16's loss scaling skips a step whose norm is inf.
            grad_norm_sum=torch.zeros((), dtype=torch.float64, device=device),
            grad_norm_steps=torch.zeros((), dtype=torch.int64, device=device),
            lr=lr,
            start=EpochStart(loader=self.batches.order(), random=random_states(device)),
        )
        stream = iter(self.batches)
        if within is not None and within.steps:
            skip(stream, within.steps * self.config.grad_accum_steps)
            restore_random_states(within.rank.random, device)
            epoch.continue_from(within)
        return epoch, stream

    def save(self, epoch: _Epoch, *, end_of_epoch: bool) -> None:
        """Write ``resume.pt`` as the run stands after ``epoch``'s latest evaluation."""
        saving_started = time.perf_counter()
        device = self.session.device
        if end_of_epoch:
            # The next epoch begins from the state as it is now.
            now = EpochStart(loader=self.batches.order(), random=random_states(device))
            rank = RankProgress(start=now, random=now.random, loss_sum=0.0, seen=0)
            position, training_s = (epoch.number + 1, 0), 0.0
        else:
            rank = RankProgress(
                start=epoch.start,
                random=random_states(device),
                loss_sum=epoch.loss_sum.item(),
                seen=epoch.seen,
                grad_norm_sum=epoch.grad_norm_sum.item(),
                grad_norm_steps=int(epoch.grad_norm_steps.item()),
            )
            position, training_s = (epoch.number, epoch.steps), epoch.training_s
        point = ResumePoint(
            epoch=position[0],
            steps=position[1],
            steps_per_epoch=epoch.steps_per_epoch,
            training_s=training_s,
            lr=epoch.lr,
            evaluations=self.evaluation.state(),
            rank=rank,
            parts={name: part.state_dict() for name, part in self.parts.items()},
            wall_s=self.wall_s(),
        )
        save_resume_point(self.out, config=self.config, session=self.session, point=point)
        epoch.evaluating_s += time.perf_counter() - saving_started


#: How torch's batch norm refuses a batch of one sample with one value per channel.
_ONE_VALUE_PER_CHANNEL = (
    "Expected more than 1 value per channel when training, got input size torch.Size([1,"
)


@contextlib.contextmanager
def _evaluated(
    average: WeightAverage | None, model: nn.Module, session: RankSession, *, src: int
) -> Iterator[None]:
    """The weights an evaluation scores and saves: the average's, where the run keeps one.

    Every rank then takes rank ``src``'s average (a rank that sat out a step of an uneven epoch
    missed an update; each rank averages its own batch-norm statistics), and rank 0's own
    batch-norm statistics, as an evaluation of the student itself leaves them: so that the
    state rank 0 saves for ``--resume`` is every rank's."""
    if average is None:
        yield
        return
    session.sync_buffers(model)
    session.share_tensors(average.tensors, src=src)
    with average.swapped_into(model):
        yield


def _windows(batches: Iterable[T], size: int) -> Iterator[list[T]]:
    """``batches`` in lists of ``size`` (the last may be shorter): one optimisation step's."""
    remaining = iter(batches)
    while window := list(itertools.islice(remaining, size)):
        yield window


def _forward(task: Task, module: nn.Module, batch: Any) -> torch.Tensor:
    """``task.forward``, a batch norm's refusal of a lone sample said in one line: epochs never
    end on one (:class:`~kdcache.data.loaders.NoSingletonBatchSampler`), so it comes from
    ``--batch-size 1`` or a rank's share of one sample."""
    try:
        return task.forward(module, batch)
    except (ValueError, RuntimeError) as error:  # RuntimeError: the same, through torch.compile
        if _ONE_VALUE_PER_CHANNEL not in str(error):
            raise
        raise ConfigError(
            f"model {task.spec!r} cannot train on a batch of one sample: its batch norm needs more "
            "than one value per channel; pass --batch-size 2 or more, with at least 2 training "
            "samples per torchrun rank"
        ) from None


def _step_of(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line cut short by a kill comes after any."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _random_state_kept(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """torch's CPU generator (and ``device``'s, on CUDA) as they are now, restored on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


@dataclass
class _Epoch:
    """One epoch's training so far: its steps and samples (or tokens) seen, the sums of its
    losses and gradient norms (on the device), its last learning rate."""

    number: int
    steps_per_epoch: int
    loss_sum: torch.Tensor
    grad_norm_sum: torch.Tensor
    grad_norm_steps: torch.Tensor
    lr: float
    #: What its batches' order and random draws follow from (saved for ``--resume``).
    start: EpochStart
    steps: int = 0
    seen: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    #: Seconds spent evaluating (and saving) within the epoch: not training time.
    evaluating_s: float = 0.0
    #: Seconds trained in this epoch before the run was resumed.
    trained_before_s: float = 0.0

    @property
    def training_s(self) -> float:
        return time.perf_counter() - self.started - self.evaluating_s + self.trained_before_s

    def continue_from(self, point: ResumePoint) -> None:
        """Take up this epoch's steps and sums as saved in ``point`` (a save within it)."""
        self.steps, self.seen, self.lr = point.steps, point.rank.seen, point.lr
        self.loss_sum += point.rank.loss_sum
        self.grad_norm_sum += point.rank.grad_norm_sum
        self.grad_norm_steps += point.rank.grad_norm_steps
        self.trained_before_s = point.training_s

    @property
    def step(self) -> int:
        """The run's optimisation steps so far, each earlier epoch counted as the longest rank's
        (the learning-rate curve's) steps, so every rank counts alike."""
        return (self.number - 1) * self.steps_per_epoch + self.steps

    @property
    def progress(self) -> float:
        """Epochs done so far, fractions included."""
        return self.number - 1 + self.steps / self.steps_per_epoch


@dataclass
class _Evaluations:
    """The held-out evaluations of one run, at epochs' ends and every ``--eval-every`` steps:
    each a line of ``metrics.jsonl`` (rank 0), the best one saved as ``best``, each epoch's end
    as ``last``."""

    task: Task
    val_set: Any
    config: LoopConfig
    session: RankSession
    out: Path
    train_set: Any
    best: float | None = None
    best_epoch: int = 0
    best_step: int = 0
    score: float = math.nan

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "score": self.score,
        }

    def resume_from(self, point: ResumePoint) -> None:
        """The evaluations as they were at ``point``; ``metrics.jsonl`` cut back to them (a run
        stopped after an evaluation, before its save, left a line more, perhaps half of it)."""
        for name, value in point.evaluations.items():
            setattr(self, name, value)
        if not self.session.is_main:
            return
        path = self.metrics_path
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        kept = "".join(line for line in lines if _step_of(line) <= point.step)
        # through a temporary file: a kill while cutting back must not lose the history
        with TemporaryFile.create(
            path.with_name(path.name + ".tmp"), purpose=f"{path.name} being cut back"
        ) as temporary:
            temporary.stream.write(kept.encode())
            temporary.publish(path)

    def run(self, model: nn.Module, epoch: _Epoch, *, end_of_epoch: bool) -> None:
        # .item() waits for the last step
        summed, counted = self.session.all_sum(epoch.loss_sum.item(), epoch.seen)
        seconds = epoch.training_s
        evaluation_started = time.perf_counter()
        try:
            self._record(model, epoch, summed / counted, counted, seconds, end_of_epoch)
        finally:
            epoch.evaluating_s += time.perf_counter() - evaluation_started

    def _record(
        self,
        model: nn.Module,
        epoch: _Epoch,
        train_loss: float,
        counted: float,
        seconds: float,
        end_of_epoch: bool,
    ) -> None:
        session, task = self.session, self.task
        session.sync_buffers(model)  # every rank scores, and rank 0 saves, the same model
        metrics = task.evaluate(
            self.val_set, config=self.config, device=session.device, session=session
        )
        if not (math.isfinite(train_loss) and math.isfinite(metrics["val_loss"])):
            # NaN weights would otherwise train on silently and exit 0 with a useless model.
            raise ConfigError(
                f"training diverged in epoch {epoch.number} (train loss {train_loss:.4g}, "
                f"validation loss {metrics['val_loss']:.4g}); lower --lr, or check "
                "--temperature and the loss's options"
            )
        step = epoch.number * epoch.steps_per_epoch if end_of_epoch else epoch.step
        record = {
            "epoch": epoch.number,
            **({} if end_of_epoch else {"epoch_progress": round(epoch.progress, 6)}),
            "step": step,
            "train_loss": train_loss,
            "lr": epoch.lr,
            **(
                {"grad_norm": epoch.grad_norm_sum.item() / max(1, epoch.grad_norm_steps.item())}
                if self.config.max_grad_norm
                else {}
            ),
            **metrics,
            "train_time_s": round(seconds, 4),
            **task.epoch_extras(int(counted), seconds),
        }
        self.score = metrics[task.metric]
        improved = task.improves(self.score, self.best)
        if improved:
            self.best, self.best_epoch, self.best_step = self.score, epoch.number, step
        if not session.is_main:
            return  # the metrics are the same on every rank, so is the result
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d/%d%s  train_loss %.4f  %s  (%.1fs)",
            epoch.number,
            self.config.epochs,
            "" if end_of_epoch else f" (step {step})",
            train_loss,
            describe_metrics(record, task.metric),
            seconds,
        )
        names = (["best"] if improved else []) + (["last"] if end_of_epoch else [])
        for name in names:
            task.save(
                self.out,
                name,
                epoch=epoch.number,
                step=step,
                score=self.score,
                train_set=self.train_set,
            )
