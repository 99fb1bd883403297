"""timm's train.py-style loop from a store: the dataset yields each input's store row, the task's
loss is the kdcache loss on exactly those rows, and a dataset the store was not dumped from is
refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("timm.task", reason="the [timm] extra (with timm.task) is not installed")

from kdcache.data.datasets import build_dataset
from kdcache.errors import StoreMismatchError
from kdcache.integrations.indexed import IndexedDataset
from kdcache.integrations.timm_loop import StoreDistillationTask
from kdcache.logits.losses import FocalDistillationLoss, LogitsDistillationLoss
from kdcache.models import build_model
from kdcache.store.read.reader import open_store
from kdcache.store.write.writer import create_store

SPEC = "fake:24:8:3"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    dataset = build_dataset(SPEC)
    path = tmp_path_factory.mktemp("timm_loop") / "s.zarr"
    writer = create_store(
        path, num_samples=len(dataset), num_classes=3, encoding="topk:2", labels=dataset.labels
    )
    logits = np.random.default_rng(0).normal(size=(len(dataset), 3)).astype(np.float32)
    writer.write(np.arange(len(dataset)), logits)
    writer.finalize()
    return path


def test_the_task_distils_each_input_on_the_rows_of_its_indices(store):
    dataset = build_dataset(SPEC)
    indexed = IndexedDataset(dataset, store, indices=[3, 7, 11, 20])
    assert len(indexed) == 4
    x, y, index = indexed[1]
    assert index == 7
    assert torch.equal(torch.as_tensor(x), torch.as_tensor(dataset[7][0]))
    assert y == dataset[7][1]
    torch.manual_seed(0)
    student = build_model("mlp:8", num_classes=3, in_channels=3)
    loss = LogitsDistillationLoss(temperature=2.0, alpha=0.6)
    task = StoreDistillationTask(student, store, loss=loss)
    inputs, targets, rows = next(iter(DataLoader(indexed, batch_size=4)))
    result = task(inputs, targets, rows)
    assert set(result) == {"loss", "output", "kd_loss", "task_loss"}
    expected = loss(student(inputs), open_store(store).read([3, 7, 11, 20]), targets)
    torch.testing.assert_close(result["loss"], expected["total"])
    torch.testing.assert_close(result["kd_loss"], expected["soft"])
    result["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())


def test_a_loss_returning_a_tensor_gives_the_loss_and_the_output(store):
    student = build_model("mlp:8", num_classes=3, in_channels=3)
    task = StoreDistillationTask(student, store, loss=FocalDistillationLoss())
    inputs, targets, rows = next(iter(DataLoader(IndexedDataset(build_dataset(SPEC), store))))
    assert set(task(inputs, targets, rows)) == {"loss", "output"}


def test_a_dataset_the_store_was_not_dumped_from_is_refused(store):
    with pytest.raises(StoreMismatchError, match="holds 24 samples but dataset 'fake:25:8:3'"):
        IndexedDataset(build_dataset("fake:25:8:3"), store)
