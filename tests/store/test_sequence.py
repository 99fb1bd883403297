"""Sequence stores: ragged samples as slices of token rows, every encoding, resume, plain zarr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from narrowing import dense, kdcache_record, stored, zarr_array

from kdcache.errors import ConfigError, StoreFormatError, StoreIncompleteError
from kdcache.logits.sampled import SampledLogits
from kdcache.logits.sparse import SparseLogits
from kdcache.store.sequence import (
    create_sequence_store,
    open_sequence_store,
    rows_of,
    sequence_offsets,
)
from kdcache.store.tools.pack import pack_store
from kdcache.store.tools.verify import verify_store
from kdcache.store.write.writer import create_store

VOCAB = 50
LENGTHS = (4, 9, 2, 6, 13)


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, VOCAB, size=n) for n in LENGTHS]
    logits = [rng.normal(size=(n - 1, VOCAB)).astype(np.float32) * 3 for n in LENGTHS]
    return sequences, logits


def test_rows_of_concatenates_each_samples_slice_in_order():
    offsets = sequence_offsets(LENGTHS)
    assert offsets.tolist() == [0, 3, 11, 12, 17, 29]
    got = rows_of(offsets, np.array([3, 0, 2]))
    assert got.tolist() == [12, 13, 14, 15, 16, 0, 1, 2, 11]
    assert rows_of(offsets, np.array([], dtype=np.int64)).size == 0


@pytest.mark.parametrize("encoding", ["float32", "float16", "topk:5", "sampled:8"])
def test_write_in_any_order_and_read_ragged_batches(tmp_path, encoding):
    sequences, logits = make_data()
    path = tmp_path / "lm.zarr"
    writer = create_sequence_store(
        path, sequences=sequences, vocab_size=VOCAB, encoding=encoding, chunk_rows=7
    )
    for batch in ([4, 1], [0], [3, 2]):
        writer.write(batch, np.concatenate([logits[i] for i in batch]))
    writer.finalize()

    store = open_sequence_store(path)
    assert store.num_sequences == len(LENGTHS)
    assert store.num_tokens == sum(n - 1 for n in LENGTHS)
    assert store.lengths.tolist() == list(LENGTHS)
    for i, tokens in enumerate(sequences):
        assert store.tokens(i).tolist() == tokens.tolist()
    batch = [2, 4, 0]
    rows = store.read(batch, temperature=2.0)
    want = np.concatenate([logits[i] for i in batch])
    if encoding == "float32":
        assert isinstance(rows, torch.Tensor)
        assert np.array_equal(rows.numpy(), want)
    elif encoding == "float16":
        assert np.allclose(dense(rows).numpy(), want, atol=1e-2)
    elif encoding.startswith("topk"):
        assert isinstance(rows, SparseLogits)
        assert rows.shape == want.shape
        top = np.sort(np.argsort(-want, axis=1)[:, :5], axis=1)
        assert np.array_equal(np.sort(rows.indices.numpy(), axis=1), top)
    else:
        assert isinstance(rows, SampledLogits)
        assert rows.shape == want.shape
        assert torch.allclose(rows.probs.sum(dim=1), torch.ones(len(want)))
    # sample 4's slice of a batch is its own rows, whatever the batch
    alone = store.read([4])
    if isinstance(alone, torch.Tensor):
        assert torch.equal(alone, dense(rows)[1 : 1 + LENGTHS[4] - 1])
    assert verify_store(path).ok


def test_plain_zarr_reads_a_samples_rows_and_tokens(tmp_path):
    sequences, logits = make_data(1)
    writer = create_sequence_store(tmp_path / "lm.zarr", sequences=sequences, vocab_size=VOCAB)
    writer.write(range(len(LENGTHS)), np.concatenate(logits))
    writer.finalize()
    group = zarr.open_group(tmp_path / "lm.zarr", mode="r")
    offsets = stored(group, "offsets")
    start, stop = offsets[1], offsets[2]
    assert np.allclose(zarr_array(group, "logits")[start:stop], logits[1], atol=1e-2)
    tokens = [zarr_array(group, "first_token")[1], *stored(group, "labels")[start:stop]]
    assert tokens == sequences[1].tolist()
    assert kdcache_record(group)["extra"]["sequence"]["num_sequences"] == len(LENGTHS)


def test_resume_writes_only_the_missing_samples(tmp_path):
    sequences, logits = make_data(2)
    path = tmp_path / "lm.zarr"
    writer = create_sequence_store(
        path, sequences=sequences, vocab_size=VOCAB, encoding="float32", chunk_rows=4
    )
    assert writer.pending_samples().tolist() == [0, 1, 2, 3, 4]
    writer.write([0, 1], np.concatenate(logits[:2]))  # rows 0-10: chunks 0 and 1 complete
    writer.close()
    with pytest.raises(StoreIncompleteError):
        open_sequence_store(path)
    again = create_sequence_store(
        path, sequences=sequences, vocab_size=VOCAB, encoding="float32", chunk_rows=4, resume=True
    )
    # chunk 2 (rows 8-11) holds the end of sample 1 and sample 2: both are recomputed
    assert again.pending_samples().tolist() == [1, 2, 3, 4]
    pending = again.pending_samples()
    again.write(pending, np.concatenate([logits[i] for i in pending]))
    again.finalize()
    store = open_sequence_store(path)
    assert np.array_equal(dense(store.read(range(5))).numpy(), np.concatenate(logits))


def test_overwrite_and_pack_keep_the_sequence_layout(tmp_path):
    def dump(seed: int, **options) -> None:
        sequences, logits = make_data(seed)
        with create_sequence_store(
            path, sequences=sequences, vocab_size=VOCAB, encoding="float32", **options
        ) as writer:
            writer.write(range(len(sequences)), np.concatenate(logits))
            writer.finalize()

    path = tmp_path / "lm.zarr"
    dump(0)
    dump(3, overwrite=True)  # built beside the old store, then swapped in: offsets included
    sequences, logits = make_data(3)
    pack_store(path, tmp_path / "lm.zip")
    for store in (open_sequence_store(path), open_sequence_store(tmp_path / "lm.zip")):
        assert store.tokens(4).tolist() == sequences[4].tolist()
        assert np.array_equal(dense(store.read(range(5))).numpy(), np.concatenate(logits))


def test_refusals_are_one_line(tmp_path):
    sequences, _ = make_data()
    with pytest.raises(ConfigError, match="2 tokens per sample"):
        create_sequence_store(
            tmp_path / "a.zarr", sequences=[*sequences, np.array([1])], vocab_size=VOCAB
        )
    image = create_store(tmp_path / "img.zarr", num_samples=2, num_classes=3)
    image.write([0, 1], np.zeros((2, 3), dtype=np.float32))
    image.finalize()
    with pytest.raises(StoreFormatError, match="not a sequence store"):
        open_sequence_store(tmp_path / "img.zarr")
