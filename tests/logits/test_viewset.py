"""viewset:M: a class set shared by a sample's views, companded offsets, quantised tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache import create_store, open_store
from kdcache.errors import ConfigError, SpecError
from kdcache.logits.encodings import ViewSetEncoding, parse_encoding
from kdcache.logits.fidelity import sparse_kl_divergence
from kdcache.logits.sparse import tail_statistics
from kdcache.logits.viewset import DEPTH, TAIL_STEP

CLASSES, VIEWS = 200, 8


def viewset(spec: str) -> ViewSetEncoding:
    encoding = parse_encoding(spec, num_classes=CLASSES)
    assert isinstance(encoding, ViewSetEncoding)
    return encoding


def view_logits(samples: int = 24, seed: int = 0) -> np.ndarray:
    """Logits of VIEWS views per sample: each sample has a few likely classes whose scores
    every view moves a little, over a Gaussian tail (views of one image agree on most of their
    top classes, not on their order)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(samples, VIEWS, CLASSES))
    head = rng.integers(CLASSES, size=(samples, 1, 6))
    scores = np.array([12.0, 10.0, 9.0, 8.0, 6.0, 5.0]) + rng.normal(size=(samples, VIEWS, 6))
    np.put_along_axis(logits, np.broadcast_to(head, scores.shape), scores, axis=2)
    return logits.reshape(-1, CLASSES).astype(np.float32)


def fkd_top5_kl(logits: np.ndarray, temperature: float) -> float:
    """FKD's top-5 at its best: the exact top-5 probabilities at T, the rest spread uniformly."""
    log_p = torch.log_softmax(torch.from_numpy(logits).double() / temperature, dim=1)
    p = log_p.exp()
    top = p.topk(5, dim=1)
    rest = (1 - top.values.sum(dim=1, keepdim=True)) / (p.shape[1] - 5)
    q = rest.expand_as(p).clone().scatter_(1, top.indices, top.values)
    return float((p * (log_p - q.log())).sum(dim=1).mean())


def test_views_of_a_sample_share_their_class_set_and_each_keeps_its_top_class():
    logits = view_logits()
    samples = np.arange(len(logits)) // VIEWS
    encoding = viewset("viewset:8")
    arrays = encoding.encode_views(logits, samples)
    sets = arrays["set_indices"].reshape(-1, VIEWS, 8)
    assert (sets == sets[:, :1]).all()
    assert (np.diff(arrays["set_indices"].astype(int), axis=1) > 0).all()  # ascending, distinct
    assert (arrays["set_indices"] == logits.argmax(1)[:, None]).any(axis=1).all()
    sparse = encoding.sparse(arrays)
    assert torch.equal(sparse.indices[:, 0], torch.from_numpy(logits.argmax(1)).long())
    assert (sparse.values[:, 1:] <= sparse.values[:, :-1]).all()  # descending, as topk:K's


def test_a_row_encoded_alone_gets_its_own_top_classes():
    logits = view_logits()
    arrays = viewset("viewset:8").encode(logits)
    top = np.sort(np.argsort(-logits, axis=1)[:, :8], axis=1)
    assert np.array_equal(arrays["set_indices"], top)


def test_offsets_and_tail_statistics_are_within_their_quantisation_steps():
    logits = view_logits()
    samples = np.arange(len(logits)) // VIEWS
    encoding = viewset("viewset:12:5")
    arrays = encoding.encode_views(logits, samples)
    sparse = encoding.sparse(arrays)
    stored_max = arrays["row_max"].astype(np.float32)
    true_max = logits.max(1)
    assert np.abs(stored_max - true_max).max() <= 0.125 + 0.01  # a quarter nat, float16
    true = np.take_along_axis(logits, sparse.indices.numpy(), axis=1) - true_max[:, None]
    decoded = sparse.values.numpy() - stored_max[:, None]
    inside = true >= -DEPTH
    # Rounded to the nearest level in the companded domain sqrt(-d / DEPTH), 31 steps.
    companded = np.sqrt(np.clip(-true, 0, None) / DEPTH)
    error = np.abs(np.sqrt(-decoded / DEPTH) - companded)
    assert error[inside & (decoded < 0)].max() <= 0.5 / 31 + 1e-4
    assert error[inside].max() <= 1 / 31 + 1e-4
    # ...but level 0 is the top class's alone: a runner-up within half a step of it gets level 1.
    assert (decoded == 0).sum(axis=1).tolist() == [1] * len(logits)
    assert (decoded[~inside] == -DEPTH).all()
    tail = tail_statistics(logits, sparse.indices).numpy() - true_max[:, None]
    assert np.abs(sparse.tail.numpy() - stored_max[:, None] - tail).max() <= TAIL_STEP / 2 + 1e-3


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_viewset_16_is_closer_to_the_teacher_than_fkd_top5(temperature):
    logits = view_logits()
    samples = np.arange(len(logits)) // VIEWS
    encoding = viewset("viewset:16")
    sparse = encoding.sparse(encoding.encode_views(logits, samples))
    kl = float(sparse_kl_divergence(logits, sparse, temperature).mean())
    assert kl < fkd_top5_kl(logits, temperature)


@pytest.mark.parametrize(
    "spec", ["viewset", "viewset:0", "viewset:x", "viewset:8:1", "viewset:8:9", "viewset:8:"]
)
def test_a_malformed_viewset_spec_is_refused_in_one_line(spec):
    with pytest.raises(SpecError, match="viewset:M or viewset:M:BITS"):
        parse_encoding(spec)


def test_a_set_as_large_as_the_classes_is_refused():
    with pytest.raises(ConfigError, match="viewset:M with M < 10"):
        parse_encoding("viewset:10").layout(10)


def test_a_store_with_views_reads_back_what_the_encoding_gives(tmp_path):
    logits = view_logits(samples=10)
    samples = np.arange(len(logits)) // VIEWS
    writer = create_store(
        tmp_path / "s.zarr",
        num_samples=10,
        num_classes=CLASSES,
        encoding="viewset:8",
        views=VIEWS,
        fsync=False,
    )
    # Two blocks that split sample 4's views: each part gets a set of its own.
    writer.write(np.arange(36), logits[:36])
    writer.write(np.arange(36, 80), logits[36:])
    writer.finalize()
    store = open_store(tmp_path / "s.zarr")
    sparse = store.read_sparse(np.arange(80))
    encoding = viewset("viewset:8")
    expected = [
        encoding.sparse(encoding.encode_views(logits[:36], samples[:36])),
        encoding.sparse(encoding.encode_views(logits[36:], samples[36:])),
    ]
    assert torch.equal(sparse.indices, torch.cat([part.indices for part in expected]))
    assert torch.equal(sparse.values, torch.cat([part.values for part in expected]))
    assert torch.equal(sparse.tail, torch.cat([part.tail for part in expected]))
    assert store.metadata.fidelity is not None
