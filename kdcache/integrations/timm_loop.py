"""Distill from a store inside a timm ``train.py``-style loop: a dataset and a ``TrainingTask``.

timm's training script (``timm.task``, tested with timm 1.0.31) builds a task from the model and
the loss and calls ``task(input, target)`` once per batch. A store replaces the teacher of timm's
``LogitDistillationTask`` with a lookup by sample index, so two pieces change:

- :class:`~kdcache.integrations.indexed.IndexedDataset` wraps the training dataset (timm's own
  ``create_dataset`` with its train transform, or any map-style dataset of ``(input, target)``)
  and yields ``(input, target, index)``, ``index`` naming the store row of that input.
- :class:`StoreDistillationTask` is a ``timm.task.TrainingTask`` whose ``forward(input, target,
  index)`` reads the batch's teacher rows from the store, in one gather, and applies a kdcache
  loss (:data:`kdcache.logits.losses.LOSSES`: its temperature and alpha are set there). It
  returns ``loss``, ``output`` and, for ``kd``, ``kd_loss`` and ``task_loss``, as timm's tasks
  do, and keeps their ``prepare_distributed``, ``compile``, EMA and checkpoint methods.

The loop passes the index through: ``for input, target, index in loader: task(input, target,
index)``. timm's prefetcher and its collate-time mixup/cutmix assume ``(input, target)`` batches
and soft targets; leave them off (a plain ``torch.utils.data.DataLoader``), and dump the store
with kdcache's own replayed ``--augment`` recipe (mixup and cutmix included) when the student must
see exactly the views the teacher saw.

timm (the ``[timm]`` extra) is imported when this module is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from kdcache.errors import ConfigError
from kdcache.logits.losses import LogitsDistillationLoss
from kdcache.store.format.layout import StoreLike
from kdcache.store.read.reader import StoreReader, open_store

try:
    from timm.task import TrainingTask
except ImportError:  # timm missing, or older than its task API
    raise ConfigError(
        "kdcache.integrations.timm_loop needs timm with its task API (timm.task); "
        'install it with pip install "kdcache[timm]" (or pip install -U timm)'
    ) from None


class StoreDistillationTask(TrainingTask):
    """timm's logit distillation with the teacher read from a store: ``forward(input, target,
    index)`` gives ``{"loss", "output", ...}``.

    ``loss`` is any kdcache image loss, called as ``loss(student_logits, teacher_rows, target)``
    (default :class:`~kdcache.logits.losses.LogitsDistillationLoss` at its default temperature
    and alpha); the rows of ``index`` come from ``store`` in whatever encoding it holds (dense,
    ``int8``, or ``topk:K`` rows the loss softens at its own temperature). ``target`` holds class
    indices (-1 for an unlabeled sample). ``memory_budget`` is that of
    :func:`~kdcache.store.read.reader.open_store`.
    """

    def __init__(
        self,
        student: nn.Module,
        store: StoreLike | StoreReader,
        *,
        loss: nn.Module | None = None,
        memory_budget: int | str | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = student
        self.distillation_loss = LogitsDistillationLoss() if loss is None else loss
        self.store = (
            store
            if isinstance(store, StoreReader)
            else open_store(store, memory_budget=memory_budget)
        )

    def prepare_distributed(
        self, device_ids: list | None = None, **ddp_kwargs: Any
    ) -> StoreDistillationTask:
        """Wrap the student in DistributedDataParallel; each rank reads its own batches' rows."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(
            self.trainable_module, device_ids=device_ids, **ddp_kwargs
        )
        return self

    def compile(  # type: ignore[override]  # timm's signature, not nn.Module's
        self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any
    ) -> nn.Module:
        """``torch.compile`` the student (train and eval share its forward)."""
        compiled = cast(
            nn.Module,
            torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs),
        )
        self.trainable_module = compiled
        self.eval_model = compiled
        return compiled

    def forward(  # type: ignore[override]  # timm's tasks take (input, target)
        self, input: torch.Tensor, target: torch.Tensor, index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``loss`` (to back-propagate), ``output`` (the student's logits) and, for a loss that
        returns its parts, ``kd_loss`` (the soft term) and ``task_loss`` (the hard one)."""
        output = self.trainable_module(input)
        rows = index.detach().cpu() if isinstance(index, torch.Tensor) else index
        teacher = self.store.read(rows).to(output.device)
        terms = self.distillation_loss(output, teacher, target)
        if not isinstance(terms, Mapping):
            return {"loss": terms, "output": output}
        return {
            "loss": terms["total"],
            "output": output,
            "kd_loss": terms["soft"],
            "task_loss": terms["hard"],
        }
