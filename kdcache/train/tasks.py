"""What a run optimises and how it is scored: a :class:`Task` per kind of model and objective.

A task holds the student and turns (batch, teacher targets) into the loss; it loads its data as
batches on the device, scores the student on the held-out split and saves it. Images and
language models each have a family (:class:`ImageTask`, :class:`TokenTask`) that owns the batches,
the forward pass, the metric (accuracy or perplexity) and the checkpoint; each family has a
cross-entropy task and a distillation task. Where the teacher's targets come from (a store or a
live model) is :mod:`kdcache.train.teachers`' concern, not the task's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from kdcache._version import __version__
from kdcache.data.datasets import LabeledDataset
from kdcache.data.device_input import Attach, DeviceBatch, InputPipeline
from kdcache.data.loaders import loader_order, restore_loader_order
from kdcache.distributed import RankSession
from kdcache.lm.models import CausalLM, lm_logits, pad_id, save_causal_lm
from kdcache.lm.plots import plot_lm_curves
from kdcache.lm.text import TokenBatch, TokenDataset, collate
from kdcache.logits.losses import total_loss
from kdcache.plots.figures import plot_curves
from kdcache.run_folder import atomic_torch_save
from kdcache.runtime import autocast

if TYPE_CHECKING:
    from kdcache.augment.views import ViewDataset
    from kdcache.train.views import Views


class Task(ABC):
    """The student, its objective, its data's batches, its metric and its checkpoint."""

    #: The held-out metric that picks ``best``: a key of :meth:`evaluate`'s result.
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    #: What exists in a finished run folder (``prepare_output_dir``'s marker).
    finished_marker: ClassVar[str]

    def __init__(self, model: nn.Module, spec: str) -> None:
        self.model = model
        self.spec = spec

    @abstractmethod
    def batches(
        self,
        dataset: Any,
        *,
        config: Any,
        device: torch.device,
        sampler: Sampler[int] | None,
        attach: Attach | None,
    ) -> tuple[EpochBatches, int]:
        """This epoch's batches on ``device`` (an iterable to go through once per epoch, from
        one loader built once), and how many there are."""

    @abstractmethod
    def forward(self, module: nn.Module, batch: Any) -> torch.Tensor:
        """The logits of ``module`` (the model, possibly compiled or in DDP) on ``batch``."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: Any, teacher: Any) -> torch.Tensor:
        """The batch's loss from the float32 logits and the teacher's targets (None for CE)."""

    @abstractmethod
    def weight(self, batch: Any) -> int:
        """How many items the batch's loss averages over (samples or tokens)."""

    @abstractmethod
    def evaluate(
        self, dataset: Any, *, config: Any, device: torch.device, session: RankSession
    ) -> dict[str, float]:
        """Held-out metrics, ``val_loss`` and :attr:`metric` among them."""

    @abstractmethod
    def save(
        self, out: Path, name: str, *, epoch: int, step: int, score: float, train_set: Any
    ) -> None:
        """Write the student as checkpoint ``name`` (best, last) in ``out``, as it was at
        optimisation ``step`` of the run, in ``epoch``."""

    @abstractmethod
    def plot(self, metrics: Path, out: Path) -> None:
        """Draw the run's curves from ``metrics.jsonl``."""

    def epoch_extras(self, seen: int, seconds: float) -> dict[str, float]:
        """More entries for the epoch's metrics record."""
        return {}

    def improves(self, score: float, best: float | None) -> bool:
        if best is None:
            return True
        return score > best if self.higher_is_better else score < best


class ImageTask(Task):
    """Image classifiers: batches from :class:`InputPipeline`, accuracy, ``best.pt``/``last.pt``.

    ``views`` (a run with augmented views) mixes the CE term's labels like the inputs.
    """

    metric = "val_acc"
    higher_is_better = True
    finished_marker = "last.pt"

    def __init__(self, model: nn.Module, spec: str, *, views: Views | None = None) -> None:
        super().__init__(model, spec)
        self.views = views

    def batches(
        self,
        dataset: LabeledDataset | ViewDataset,
        *,
        config: Any,
        device: torch.device,
        sampler: Sampler[int] | None,
        attach: Attach | None,
    ) -> tuple[EpochBatches, int]:
        pipeline = InputPipeline(dataset, device=device, channels_last=config.channels_last)
        loader = pipeline.loader(
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            shuffle=True,
            seed=config.seed,
            sampler=sampler,
        )
        batches = EpochBatches(lambda: pipeline.batches(loader, attach=attach), loader=loader)
        return batches, len(loader)

    def forward(self, module: nn.Module, batch: DeviceBatch) -> torch.Tensor:
        return module(batch.inputs)

    def mixed_hard_loss(self, logits: torch.Tensor, batch: DeviceBatch) -> torch.Tensor | None:
        if self.views is None:
            return None
        return self.views.mixed_hard_loss(logits, batch.labels, self.views.rows(batch.indices))

    def weight(self, batch: DeviceBatch) -> int:
        return batch.labels.size(0)

    def evaluate(
        self,
        dataset: LabeledDataset,
        *,
        config: Any,
        device: torch.device,
        session: RankSession,
    ) -> dict[str, float]:
        accuracy, loss = evaluate(
            self.model,
            dataset,
            batch_size=config.batch_size,
            device=device,
            amp=config.amp,
            channels_last=config.channels_last,
            session=session,
        )
        return {"val_acc": accuracy, "val_loss": loss}

    def save(
        self,
        out: Path,
        name: str,
        *,
        epoch: int,
        step: int,
        score: float,
        train_set: LabeledDataset | ViewDataset,
    ) -> None:
        checkpoint = {
            "state_dict": self.model.state_dict(),
            "model": self.spec,
            "num_classes": train_set.num_classes,
            "in_channels": train_set.in_channels,
            "dataset": {"spec": train_set.spec, "split": train_set.split},
            "epoch": epoch,
            "step": step,
            "val_acc": score,
            "kdcache_version": __version__,
        }
        atomic_torch_save(checkpoint, out / f"{name}.pt")

    def plot(self, metrics: Path, out: Path) -> None:
        plot_curves(metrics, out / "curves.png", title=f"{self.spec}: {out.resolve().name}")


class Classification(ImageTask):
    """Plain cross-entropy on the labels (a teacher, or the CE-only student baseline)."""

    def loss(self, logits: torch.Tensor, batch: DeviceBatch, teacher: None) -> torch.Tensor:
        loss = F.cross_entropy(logits, batch.labels)
        mixed = self.mixed_hard_loss(logits, batch)
        return loss if mixed is None else loss + mixed


class LogitDistillation(ImageTask):
    """``criterion`` (a loss of :data:`kdcache.logits.losses.LOSSES`) against the teacher's
    logits: alpha * soft + (1 - alpha) * CE."""

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        *,
        criterion: nn.Module,
        alpha: float,
        views: Views | None = None,
    ) -> None:
        super().__init__(model, spec, views=views)
        self.criterion = criterion
        self.alpha = alpha

    def loss(self, logits: torch.Tensor, batch: DeviceBatch, teacher: Any) -> torch.Tensor:
        loss = total_loss(self.criterion(logits, teacher, batch.labels))
        mixed = self.mixed_hard_loss(logits, batch)
        # Every loss is alpha * soft + (1 - alpha) * CE: mix the CE term's labels like the input.
        return loss if mixed is None else loss + (1 - self.alpha) * mixed


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


@dataclass(frozen=True)
class IndexedTokens:
    """Collates sample indices into a :class:`TokenBatch` (a module-level class: loader worker
    processes receive it)."""

    dataset: TokenDataset
    pad_id: int

    def __call__(self, samples: list[int]) -> TokenBatch:
        return collate(self.dataset, samples, pad_id=self.pad_id)


class TokenTask(Task):
    """Causal language models: padded token batches, perplexity, ``best/``/``last/`` folders
    (``save_pretrained``, usable as ``hf:RUN/best``)."""

    metric = "val_ppl"
    higher_is_better = False
    finished_marker = "last"

    def __init__(self, student: CausalLM) -> None:
        super().__init__(student.model, student.spec)
        self.student = student

    def loader(
        self, dataset: TokenDataset, *, batch_size: int, num_workers: int = 0, **options: Any
    ) -> DataLoader:
        return DataLoader(
            range(len(dataset)),  # type: ignore[arg-type]
            batch_size=batch_size,
            collate_fn=IndexedTokens(dataset, pad_id(self.student)),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            **options,
        )

    def batches(
        self,
        dataset: TokenDataset,
        *,
        config: Any,
        device: torch.device,
        sampler: Sampler[int] | None,
        attach: Attach | None,
    ) -> tuple[EpochBatches, int]:
        shuffle = sampler is None
        loader = self.loader(
            dataset,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            sampler=sampler,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(config.seed) if shuffle else None,
        )
        batches = EpochBatches(lambda: (batch.to(device) for batch in loader), loader=loader)
        return batches, len(loader)

    def forward(self, module: nn.Module, batch: TokenBatch) -> torch.Tensor:
        return lm_logits(
            module, batch.input_ids, batch.attention_mask, width=self.student.vocab_size
        )

    def weight(self, batch: TokenBatch) -> int:
        return int(batch.mask.sum())

    @torch.no_grad()
    def evaluate(
        self, dataset: TokenDataset, *, config: Any, device: torch.device, session: RankSession
    ) -> dict[str, float]:
        """Mean next-token cross-entropy (nats per token) over every token of ``dataset``, and
        its perplexity exp(CE); under torchrun each rank scores a slice and the sums are added."""
        self.model.eval()
        loader = self.loader(
            dataset,
            batch_size=config.batch_size,
            sampler=session.shard_sampler(len(dataset)),
        )
        total, count = 0.0, 0
        for cpu_batch in loader:
            batch = cpu_batch.to(device)
            with autocast(device, config.amp):
                logits = self.forward(self.model, batch)
            total += F.cross_entropy(
                logits[batch.mask], batch.targets[batch.mask], reduction="sum"
            ).item()
            count += self.weight(batch)
        total, counted = session.all_sum(total, count)
        loss = total / counted
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def save(
        self, out: Path, name: str, *, epoch: int, step: int, score: float, train_set: Any
    ) -> None:
        record = {"epoch": epoch, "step": step, self.metric: score, "kdcache_version": __version__}
        save_causal_lm(self.student, out / name, record=record)

    def plot(self, metrics: Path, out: Path) -> None:
        title = f"{self.spec}: {out.resolve().name}"
        plot_lm_curves(metrics, out / "curves.png", title=title)

    def epoch_extras(self, seen: int, seconds: float) -> dict[str, float]:
        return {"train_tokens_per_s": round(seen / seconds, 1)}


class NextToken(TokenTask):
    """Next-token cross-entropy (a teacher, or the CE-only student baseline)."""

    def loss(self, logits: torch.Tensor, batch: TokenBatch, teacher: None) -> torch.Tensor:
        return F.cross_entropy(logits[batch.mask], batch.targets[batch.mask])


class TokenDistillation(TokenTask):
    """``criterion`` (a loss of :data:`kdcache.logits.sequence_losses.TOKEN_LOSSES`) against
    the teacher's rows, one per counted position."""

    def __init__(self, student: CausalLM, *, criterion: nn.Module) -> None:
        super().__init__(student)
        self.criterion = criterion

    def loss(self, logits: torch.Tensor, batch: TokenBatch, teacher: Any) -> torch.Tensor:
        return self.criterion(logits, teacher, batch.targets, batch.mask)["total"]


class EpochBatches:
    """An epoch's batches from ``loader`` (built once), through ``start`` for every pass; the
    state that decides the next pass's order can be taken and given back (``--resume``)."""

    def __init__(self, start: Callable[[], Iterator[Any]], *, loader: DataLoader) -> None:
        self.start = start
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return self.start()

    def order(self) -> dict[str, Any]:
        """What decides the next pass's order (:func:`~kdcache.data.loaders.loader_order`)."""
        return loader_order(self.loader)

    def restore_order(self, order: dict[str, Any], *, after_first_epoch: bool) -> None:
        restore_loader_order(self.loader, order, after_first_epoch=after_first_epoch)


def describe_metrics(record: Mapping[str, float], metric: str) -> str:
    value = record[metric]
    return f"{metric} {value:.2f}%" if metric == "val_acc" else f"{metric} {value:.3f}"
