"""Where a distillation's teacher targets come from: a store (cached) or a live model (online).

A :class:`TeacherSource` gives, for each batch, the teacher's targets in the one form the task's
loss takes: image logits (B, C) (dense, or sparse from a ``topk:K`` store), or one row per
counted token position for a language model. The cached/online difference lives here and
nowhere else: the loop and the tasks never ask which one they have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache.data.device_input import Attach, DeviceBatch
from kdcache.lm.models import CausalLM
from kdcache.lm.text import TokenBatch
from kdcache.logits.ensemble import combine_logits
from kdcache.logits.sequence_losses import TokenTeacher
from kdcache.logits.sparse import TeacherInput
from kdcache.runtime import autocast
from kdcache.store.read.feed import Feed
from kdcache.store.sequence import SequenceReader
from kdcache.train.views import Views


class TeacherSource(ABC):
    """The teacher's targets of each batch."""

    #: Looks up, beside the loader, what rides along with each batch to the device; None when
    #: the targets are computed in the step.
    attach: Attach | None = None

    @abstractmethod
    def targets(self, batch: Any) -> Any:
        """The teacher's targets for ``batch``, on its device."""


class StoreLogits(TeacherSource):
    """Image logits read from a store's feed (a view's row in a store of views)."""

    def __init__(self, feed: Feed, views: Views | None) -> None:
        self.feed = feed
        self.views = views

        def attach(indices: torch.Tensor) -> TeacherInput:
            # Gathered on the host and copied with the batch's images, one batch ahead; a
            # topk:K store's rows stay sparse (no dense (B, C) tensor): the loss softens them.
            return feed.read(indices if views is None else views.rows(indices))

        self.attach = attach

    def targets(self, batch: DeviceBatch) -> TeacherInput:
        assert batch.teacher is not None
        return batch.teacher


class EnsembleLogits(TeacherSource):
    """The ensemble of several stores' image logits (a multi-teacher run), combined on the host
    batch by batch as ``kdcache merge`` combines them (:func:`~kdcache.logits.ensemble.
    combine_logits`): the loss sees one dense (B, C) teacher."""

    def __init__(
        self,
        feeds: Sequence[Feed],
        views: Views | None,
        *,
        weights: Sequence[float],
        mode: str,
        temperature: float,
    ) -> None:
        self.feeds = list(feeds)
        self.views = views
        self.weights = tuple(weights)
        self.mode = mode
        self.temperature = temperature
        self.attach = self.ensemble

    def ensemble(self, indices: torch.Tensor) -> torch.Tensor:
        """The ensemble's logits of the given samples (their views' rows in a store of views)."""
        rows = indices if self.views is None else self.views.rows(indices)
        return combine_logits(
            [feed.read(rows) for feed in self.feeds],
            weights=self.weights,
            mode=self.mode,
            temperature=self.temperature,
        )

    def targets(self, batch: DeviceBatch) -> torch.Tensor:
        assert isinstance(batch.teacher, torch.Tensor)
        return batch.teacher


class LiveLogits(TeacherSource):
    """Image logits of a live teacher (frozen, in eval mode), under the run's autocast."""

    def __init__(self, forward: nn.Module, *, device: torch.device, amp: str | None) -> None:
        self.forward = forward
        self.device = device
        self.amp = amp

    @torch.no_grad()
    def targets(self, batch: DeviceBatch) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return self.forward(batch.inputs).float()


class StoreTokens(TeacherSource):
    """A sequence store's rows of the batch's counted tokens, softened at the run's temperature.

    By default the store holds exactly the rows the batch counts, sample for sample. With
    ``samples`` (a store with a row at every position, and a run that counts only some:
    ``--train-on assistant`` from a store dumped with ``--train-on all``) dataset sample i is
    store sample ``samples[i]``, and only the rows at the batch's counted positions are read.
    """

    def __init__(
        self, store: SequenceReader, *, temperature: float, samples: np.ndarray | None = None
    ) -> None:
        self.store = store
        self.temperature = temperature
        self.samples = samples

    def targets(self, batch: TokenBatch) -> TokenTeacher:
        if self.samples is None:
            rows = self.store.read(batch.indices.numpy(), temperature=self.temperature)
        else:
            # Row-major, as the losses take the student's rows: logits[mask].
            sequence, position = batch.mask.nonzero(as_tuple=True)
            owners = self.samples[batch.indices.numpy()[sequence.cpu().numpy()]]
            starts = self.store.offsets[owners]
            rows = self.store.read_rows(
                starts + position.cpu().numpy(), temperature=self.temperature
            )
        return rows.to(batch.input_ids.device)


class LiveTokens(TeacherSource):
    """A live causal LM's logits at the batch's counted positions."""

    def __init__(self, teacher: CausalLM, *, amp: str | None) -> None:
        self.teacher = teacher
        self.amp = amp

    @torch.no_grad()
    def targets(self, batch: TokenBatch) -> torch.Tensor:
        with autocast(batch.input_ids.device, self.amp):
            return self.teacher.rows(batch.input_ids, batch.attention_mask, batch.mask)
