"""kdcache concat: stores of disjoint parts of one dataset joined into one store."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from narrowing import present

from kdcache import create_store, open_store
from kdcache.errors import StoreFormatError, StoreMismatchError
from kdcache.store.format.layout import DATASET_INDICES_ARRAY
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.tools.concat import CONCATENATED_FROM_KEY, concat_stores
from kdcache.store.tools.convert import convert_store
from kdcache.store.tools.verify import verify_store

TEACHER = {"spec": "cnn:8", "weights_sha256": "0" * 64}
DATASET = {"spec": "digits", "split": "train", "fingerprint": {"num_samples": 12}}
AUGMENT = {"recipe": "flip", "seed": 0, "fields": ["flip"], "input_size": [8, 8]}


def logits(n: int, classes: int) -> np.ndarray:
    return (np.random.default_rng(5).normal(size=(n, classes)) * 3).astype(np.float32)


def whole_store(path, encoding: str, *, views: int = 1):
    params = (np.arange(12 * views) % 2).astype(np.float32).reshape(12, views, 1)
    writer = create_store(
        path,
        num_samples=12,
        num_classes=6,
        encoding=encoding,
        labels=np.arange(12) % 6,
        chunk_rows=5,
        teacher=TEACHER,
        dataset=DATASET,
        views=views,
        augment=AUGMENT if views > 1 else None,
        view_params=params if views > 1 else None,
    )
    writer.write(np.arange(12 * views), logits(12 * views, 6))
    writer.finalize()
    return path


def parts(tmp_path, source, encoding: str, *chosen: list[int], name: str = "part"):
    paths = []
    for number, indices in enumerate(chosen):
        path = tmp_path / f"{name}{number}.zarr"
        convert_store(source, path, encoding=encoding, indices=indices, chunk_rows=3)
        paths.append(path)
    return paths


@pytest.mark.parametrize(("encoding", "views"), [("float16", 1), ("sampled:4", 1), ("topk:2", 3)])
def test_interleaved_parts_join_into_the_whole_store_bit_for_bit(tmp_path, encoding, views):
    source = whole_store(tmp_path / "whole.zarr", "float32", views=views)
    reference = tmp_path / "reference.zarr"
    convert_store(source, reference, encoding=encoding)
    split = parts(tmp_path, reference, encoding, [0, 3, 4, 9], [1, 2, 10, 11], [5, 6, 7, 8])
    # Concat copies the parts' encoded rows without decoding them: a sampled store keeps its
    # draws and a topk store its tail statistics, bit for bit.
    result = concat_stores(list(reversed(split)), tmp_path / "all.zarr", chunk_rows=7)
    assert (result.num_samples, result.views, result.num_sources) == (12, views, 3)
    joined, expected = open_store(tmp_path / "all.zarr"), open_store(reference)
    assert verify_store(tmp_path / "all.zarr").ok
    for path, indices in zip(split, ([0, 3, 4, 9], [1, 2, 10, 11], [5, 6, 7, 8]), strict=True):
        part = open_store(path)
        rows = (np.array(indices)[:, None] * views + np.arange(views)).reshape(-1)
        for name in joined.encoding.layout(6):
            np.testing.assert_array_equal(
                joined.read_rows(name, 0, 12 * views)[rows], part.read_rows(name, 0, rows.size)
            )
    np.testing.assert_array_equal(joined.labels, np.arange(12) % 6)
    assert joined.metadata.dataset == DATASET
    assert joined.metadata.teacher == TEACHER
    if views > 1:
        np.testing.assert_array_equal(joined.view_params, expected.view_params)
    sources = joined.metadata.extra[CONCATENATED_FROM_KEY]
    assert [entry["num_samples"] for entry in sources] == [4, 4, 4]


def test_token_store_parts_join_by_whole_sequences(tmp_path):
    generator = np.random.default_rng(3)
    sequences = [generator.integers(0, 9, size=length) for length in (5, 2, 9, 4, 7)]
    writer = create_sequence_store(
        tmp_path / "tokens.zarr",
        sequences=sequences,
        vocab_size=9,
        encoding="float16",
        chunk_rows=4,
        dataset={"spec": "text:notes.txt", "fingerprint": {"tokens": {"num_samples": 5}}},
    )
    writer.write(np.arange(5), logits(sum(len(tokens) - 1 for tokens in sequences), 9))
    writer.finalize()
    split = parts(tmp_path, tmp_path / "tokens.zarr", "float16", [4, 1], [0, 2, 3])
    concat_stores(split, tmp_path / "all.zarr")
    joined = open_sequence_store(tmp_path / "all.zarr")
    source = open_sequence_store(tmp_path / "tokens.zarr")
    np.testing.assert_array_equal(joined.offsets, source.offsets)
    for sample, tokens in enumerate(sequences):
        np.testing.assert_array_equal(joined.tokens(sample), tokens)
    np.testing.assert_array_equal(
        np.asarray(joined.read(range(5))), np.asarray(source.read(range(5)))
    )
    assert verify_store(tmp_path / "all.zarr").ok


def test_gaps_overlaps_and_foreign_parts_are_refused_naming_the_samples(tmp_path):
    source = whole_store(tmp_path / "whole.zarr", "float16")
    a, b, c = parts(tmp_path, source, "float16", [0, 1, 2, 3, 4], [4, 5, 6], [8, 9, 10, 11])
    with pytest.raises(StoreMismatchError, match=r"both hold samples 4;"):
        concat_stores([a, b, c], tmp_path / "out.zarr")
    (d,) = parts(tmp_path, source, "float16", [5, 6], name="short")
    with pytest.raises(StoreMismatchError, match=r"no store holds samples 7 of the dataset's 12"):
        concat_stores([a, d, c], tmp_path / "out.zarr")
    with pytest.raises(StoreMismatchError, match=r"records no 'dataset_indices'"):
        concat_stores([a, source], tmp_path / "out.zarr")
    other = tmp_path / "other.zarr"
    convert_store(source, other, encoding="int8", indices=[5, 6, 7])
    with pytest.raises(StoreMismatchError, match=r"differ in their encoding"):
        concat_stores([a, other, c], tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_the_command_joins_parts_and_refuses_a_gap_in_one_line(tmp_path):
    source = whole_store(tmp_path / "whole.zarr", "float16")
    a, b = parts(tmp_path, source, "float16", list(range(6)), list(range(6, 12)))
    done = run_cli("concat", str(a), str(b), "--out", str(tmp_path / "all.zarr"))
    assert "joined 2 stores" in done.stdout
    assert open_store(tmp_path / "all.zarr").num_samples == 12
    refused = run_cli("concat", str(a), str(a), "--out", str(tmp_path / "x.zarr"), check=False)
    assert_one_line_error(refused, "both hold samples 0-5")


def test_parts_on_object_storage_join_into_a_remote_store(tmp_path, s3_bucket):
    source = whole_store(tmp_path / "whole.zarr", "float16")
    remote = [f"{s3_bucket}/part{number}.zarr" for number in range(2)]
    for path, indices in zip(remote, ([1, 3, 5, 7, 9, 11], [0, 2, 4, 6, 8, 10]), strict=True):
        convert_store(source, path, encoding="float16", indices=indices)
    result = concat_stores(remote, f"{s3_bucket}/all.zarr")
    assert result.nbytes is None  # remote
    joined, whole = open_store(f"{s3_bucket}/all.zarr"), open_store(source)
    np.testing.assert_array_equal(
        joined.read_rows("logits", 0, 12), whole.read_rows("logits", 0, 12)
    )
    assert verify_store(f"{s3_bucket}/all.zarr").ok


def assistant_only_store(path, counted_only: bool = True):
    """A token store of 4 sequences holding rows only at the counted (assistant) positions."""
    generator = np.random.default_rng(4)
    sequences = [generator.integers(0, 9, size=length) for length in (6, 4, 8, 5)]
    counted = [np.arange(len(tokens) - 1) % 2 == 1 for tokens in sequences]
    writer = create_sequence_store(
        path,
        sequences=sequences,
        vocab_size=9,
        encoding="float16",
        chunk_rows=3,
        dataset={"spec": "text:chat.jsonl", "fingerprint": {"tokens": {"num_samples": 4}}},
        counted=counted if counted_only else None,
    )
    rows = sum(int(mask.sum()) if counted_only else mask.size for mask in counted)
    writer.write(np.arange(4), logits(rows, 9))
    writer.finalize()
    return path


def test_assistant_only_parts_stay_assistant_only_through_convert_and_concat(tmp_path):
    source = assistant_only_store(tmp_path / "chat.zarr")
    split = parts(tmp_path, source, "float16", [3, 0], [1, 2])
    joined_path = tmp_path / "all.zarr"
    concat_stores(split, joined_path)
    for path in [*split, joined_path]:
        store = open_sequence_store(path)
        assert not store.every_position
        assert store.layout["max_length"] == 8  # the longest sequence, not its rows + 1
        with pytest.raises(StoreFormatError, match="--train-on assistant"):
            store.tokens(0)
    joined, original = open_sequence_store(joined_path), open_sequence_store(source)
    np.testing.assert_array_equal(joined.offsets, original.offsets)
    np.testing.assert_array_equal(joined.store.labels, original.store.labels)
    assert verify_store(joined_path).ok
    full = assistant_only_store(tmp_path / "full.zarr", counted_only=False)
    (every,) = parts(tmp_path, full, "float16", [1, 2], name="every")
    with pytest.raises(StoreMismatchError, match="differ in their rows at every position"):
        concat_stores([split[0], every], tmp_path / "mixed.zarr")
    assert not (tmp_path / "mixed.zarr").exists()


def test_a_source_listing_a_sample_twice_is_refused_naming_it(tmp_path):
    paths = []
    for number, indices in enumerate(([0, 2, 2], [1, 3, 4])):
        writer = create_store(
            tmp_path / f"part{number}.zarr",
            num_samples=3,
            num_classes=6,
            encoding="float16",
            teacher=TEACHER,
            dataset=DATASET,
            arrays={DATASET_INDICES_ARRAY: np.array(indices)},
        )
        writer.write(np.arange(3), logits(3, 6))
        writer.finalize()
        paths.append(tmp_path / f"part{number}.zarr")
    with pytest.raises(StoreMismatchError, match=r"part0.zarr.*list sample 2 more than once"):
        concat_stores(paths, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_one_encoding_typed_two_ways_joins(tmp_path):
    views = 3
    source = whole_store(tmp_path / "whole.zarr", "float32", views=views)
    (converted,) = parts(tmp_path, source, "viewset:4", list(range(6)))
    assert open_store(converted).metadata.encoding == "viewset:4"
    # A dump records the encoding as typed, its default bits included.
    whole = open_store(source)
    writer = create_store(
        tmp_path / "dumped.zarr",
        num_samples=6,
        num_classes=6,
        encoding="viewset:4:4",
        labels=np.arange(6, 12) % 6,
        teacher=TEACHER,
        dataset=DATASET,
        views=views,
        augment=AUGMENT,
        view_params=present(whole.view_params)[6:],
        arrays={DATASET_INDICES_ARRAY: np.arange(6, 12)},
    )
    writer.write(np.arange(6 * views), logits(6 * views, 6))
    writer.finalize()
    result = concat_stores([converted, tmp_path / "dumped.zarr"], tmp_path / "all.zarr")
    assert result.num_samples == 12
    assert verify_store(tmp_path / "all.zarr").ok
