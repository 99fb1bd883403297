"""Reading rows back in the form the losses take: the temperature belongs to the loss alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache import (
    AttentionLogitsLoss,
    FocalDistillationLoss,
    LogitsDistillationLoss,
    SparseLogits,
    create_store,
    open_store,
)
from kdcache.errors import ConfigError
from kdcache.logits.losses import total_loss

NUM_SAMPLES, NUM_CLASSES, K = 40, 12, 3


def teacher_logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(NUM_SAMPLES, NUM_CLASSES)) * 2.5
    logits[np.arange(NUM_SAMPLES), np.arange(NUM_SAMPLES) % NUM_CLASSES] += 4  # a clear top class
    return logits.astype(np.float32)


def write_store(path, encoding: str) -> np.ndarray:
    logits = teacher_logits()
    writer = create_store(
        path, num_samples=NUM_SAMPLES, num_classes=NUM_CLASSES, encoding=encoding, chunk_rows=16
    )
    writer.write(np.arange(NUM_SAMPLES), logits)
    writer.finalize()
    return logits


def exact_tail_teacher(logits: np.ndarray, temperature: float) -> torch.Tensor:
    """The top K logits kept, every other class given z(T) = T log mean exp(d / T) of the true
    tail values d: the teacher distribution a topk:K store stands for, computed exactly at T."""
    dense = torch.from_numpy(logits).double()
    top = dense.topk(K, dim=1).indices
    tail = dense.scatter(1, top, -math.inf)
    z = temperature * (torch.logsumexp(tail / temperature, dim=1) - math.log(NUM_CLASSES - K))
    return z[:, None].expand_as(dense).clone().scatter_(1, top, dense.gather(1, top)).float()


def make_losses(temperature: float) -> list[torch.nn.Module]:
    return [
        LogitsDistillationLoss(temperature=temperature, alpha=0.7),
        FocalDistillationLoss(temperature=temperature, alpha=0.7, gamma=2.0),
        AttentionLogitsLoss(temperature=temperature, alpha=0.7, top_k=K),
    ]


@pytest.mark.parametrize("temperature", [2.0, 4.0, 8.0])
def test_readme_pattern_from_a_topk_store_uses_the_exact_tail_at_the_losses_temperature(
    tmp_path, temperature
):
    logits = write_store(tmp_path / "s.zarr", f"topk:{K}")
    store = open_store(tmp_path / "s.zarr")
    idx = np.array([3, 17, 0, 39, 22])
    student_logits = torch.randn(len(idx), NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    labels = torch.from_numpy(idx % NUM_CLASSES)
    exact = exact_tail_teacher(logits[idx], temperature)
    at_t1 = exact_tail_teacher(logits[idx], 1.0)  # what read() used to hand every loss
    for loss_fn in make_losses(temperature):
        # The README's pattern, verbatim: nothing tells the store the loss's temperature.
        got = total_loss(loss_fn(student_logits, store.read(idx), labels))
        want = total_loss(loss_fn(student_logits, exact, labels))
        # float16 offsets in the store: equal to about 1e-3 relative
        assert got.item() == pytest.approx(want.item(), rel=2e-3), loss_fn
        stale = total_loss(loss_fn(student_logits, at_t1, labels))
        assert abs(stale.item() - want.item()) > 20 * abs(got.item() - want.item()), loss_fn


def test_read_gives_sparse_rows_for_topk_and_dense_rows_only_when_asked(tmp_path):
    write_store(tmp_path / "s.zarr", f"topk:{K}")
    store = open_store(tmp_path / "s.zarr")
    rows = store.read([5, 0])
    assert isinstance(rows, SparseLogits)
    assert rows.shape == (2, NUM_CLASSES)
    with pytest.raises(ConfigError, match=r"read_dense\(indices, temperature=T\)"):
        store.read_dense([5, 0])
    torch.testing.assert_close(store.read_dense([5, 0], temperature=3.0), rows.dense(3.0))
    sparse = store.read_sparse([5, 0])
    torch.testing.assert_close(sparse.values, rows.values)


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_dense_encodings_read_the_same_tensor_at_any_temperature(tmp_path, encoding):
    logits = write_store(tmp_path / "s.zarr", encoding)
    store = open_store(tmp_path / "s.zarr")
    rows = store.read(np.arange(NUM_SAMPLES))
    assert isinstance(rows, torch.Tensor)
    assert rows.dtype == torch.float32
    np.testing.assert_allclose(rows.numpy(), logits, atol=0.1)
    torch.testing.assert_close(store.read_dense(np.arange(4), temperature=8.0), rows[:4])
