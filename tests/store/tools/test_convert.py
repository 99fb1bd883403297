"""kdcache convert: a store written anew in another encoding, or a subset of its samples."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from narrowing import dense, present

from kdcache import DistillConfig, create_store, open_store
from kdcache.errors import ConfigError, SpecError, StoreCorruptError, StoreExistsError
from kdcache.store.format.layout import DATASET_INDICES_ARRAY
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.tools.convert import CONVERTED_FROM_KEY, convert_store
from kdcache.store.tools.verify import verify_store
from kdcache.train.loop import distill

TEACHER = {"spec": "cnn:8", "weights_sha256": "0" * 64}
DATASET = {"spec": "digits", "split": "train", "fingerprint": {"num_samples": 40}}


def teacher_logits(n: int, classes: int = 10) -> np.ndarray:
    return (np.random.default_rng(7).normal(size=(n, classes)) * 3).astype(np.float32)


@pytest.fixture
def float16_store(tmp_path):
    logits = teacher_logits(40)
    writer = create_store(
        tmp_path / "source.zarr",
        num_samples=40,
        num_classes=10,
        encoding="float16",
        labels=np.arange(40) % 10,
        chunk_rows=8,
        teacher=TEACHER,
        dataset=DATASET,
        extra={"note": "kept"},
    )
    writer.write(np.arange(40), logits)
    writer.finalize()
    return tmp_path / "source.zarr"


@pytest.mark.parametrize("encoding", ["topk:4", "int8", "sampled:8", "float32"])
def test_a_converted_store_holds_the_source_rows_in_the_new_encoding(
    tmp_path, float16_store, encoding
):
    result = convert_store(float16_store, tmp_path / "new.zarr", encoding=encoding, chunk_rows=16)
    source, converted = open_store(float16_store), open_store(tmp_path / "new.zarr")
    assert verify_store(tmp_path / "new.zarr").ok
    assert converted.metadata.encoding == encoding == result.encoding
    assert (result.num_samples, result.source_encoding) == (40, "float16")
    assert converted.metadata.chunk_rows == 16
    assert converted.metadata.teacher == TEACHER
    assert converted.metadata.dataset == DATASET
    np.testing.assert_array_equal(converted.labels, source.labels)
    origin = converted.metadata.extra[CONVERTED_FROM_KEY]
    assert converted.metadata.extra["note"] == "kept"
    assert origin["generation"] == source.metadata.generation
    assert origin["content_sha256"] == source.content_digest()
    assert (origin["encoding"], origin["indices_sha256"]) == ("float16", None)
    # The recorded fidelity is the new encoding's, measured against the source rows.
    fidelity = converted.metadata.fidelity
    assert fidelity is not None
    assert result.fidelity is not None
    assert fidelity["mean_kl"][0] == pytest.approx(result.fidelity.kl_at(1.0))
    expected = source.read_dense(np.arange(40)).numpy()
    got = converted.read_dense(np.arange(40), temperature=1.0).numpy()
    if encoding == "float32":
        assert fidelity["mean_kl"] == [0.0] * 4
        np.testing.assert_array_equal(got, expected)
    elif encoding == "int8":
        assert 0 < fidelity["mean_kl"][0] < 1e-3
        np.testing.assert_allclose(got, expected, atol=0.05)
    elif encoding == "topk:4":
        assert 0 < fidelity["mean_kl"][0] < 0.1
        top = np.argsort(-expected, axis=1)[:, :4]
        np.testing.assert_allclose(
            np.take_along_axis(got, top, 1), np.take_along_axis(expected, top, 1), atol=0.01
        )
    else:
        assert fidelity["mean_kl"][0] > 0


def test_a_lossy_source_converts_with_its_fidelity_against_its_decoded_rows(
    tmp_path, float16_store
):
    convert_store(float16_store, tmp_path / "topk.zarr", encoding="topk:4")
    convert_store(tmp_path / "topk.zarr", tmp_path / "float32.zarr", encoding="float32")
    converted = open_store(tmp_path / "float32.zarr")
    assert present(converted.metadata.fidelity)["mean_kl"] == [0.0] * 4
    assert "T=1" in converted.metadata.extra[CONVERTED_FROM_KEY]["fidelity_against"]
    np.testing.assert_array_equal(
        converted.read_dense(np.arange(40)).numpy(),
        open_store(tmp_path / "topk.zarr").read_dense(np.arange(40), temperature=1.0).numpy(),
    )


def test_a_subset_keeps_the_chosen_samples_rows_and_labels(tmp_path, float16_store):
    chosen = [33, 2, 17, 9, 8]
    result = convert_store(
        float16_store, tmp_path / "subset.zarr", encoding="float16", indices=chosen
    )
    source, subset = open_store(float16_store), open_store(tmp_path / "subset.zarr")
    order = np.sort(chosen)
    assert result.num_samples == subset.num_samples == 5
    np.testing.assert_array_equal(subset.labels, present(source.labels)[order])
    np.testing.assert_array_equal(
        subset.read_dense(np.arange(5)).numpy(), source.read_dense(order).numpy()
    )
    assert verify_store(tmp_path / "subset.zarr").ok
    # The fingerprint described all 40 samples: the subset keeps it only under subset_of.
    dataset = present(subset.metadata.dataset)
    assert dataset["subset_of"] == DATASET
    assert "fingerprint" not in dataset
    assert subset.metadata.extra[CONVERTED_FROM_KEY]["indices_sha256"]


AUGMENT = {"recipe": "flip", "seed": 3, "fields": ["flip"], "input_size": [8, 8]}


def test_a_subset_of_a_views_store_keeps_whole_samples_and_their_view_params(tmp_path):
    n, views = 9, 3
    params = (np.arange(n * views, dtype=np.float32) % 2).reshape(n, views, 1)
    params[4] = [[1], [1], [0]]
    writer = create_store(
        tmp_path / "views.zarr",
        num_samples=n,
        num_classes=5,
        encoding="float32",
        views=views,
        augment=AUGMENT,
        view_params=params,
        labels=np.arange(n) % 5,
        chunk_rows=4,  # chunks that split a sample's views
    )
    writer.write(np.arange(n * views), teacher_logits(n * views, 5))
    writer.finalize()
    convert_store(
        tmp_path / "views.zarr", tmp_path / "subset.zarr", encoding="int8", indices=[7, 4]
    )
    source, subset = open_store(tmp_path / "views.zarr"), open_store(tmp_path / "subset.zarr")
    assert (subset.num_samples, subset.views, subset.metadata.augment) == (2, 3, AUGMENT)
    logits, view_params = subset.read_views([0, 1])
    expected_logits, expected_params = source.read_views([4, 7])
    np.testing.assert_array_equal(view_params, expected_params)
    np.testing.assert_allclose(logits.numpy(), expected_logits.numpy(), atol=0.05)
    np.testing.assert_array_equal(subset.labels, [4, 2])
    assert verify_store(tmp_path / "subset.zarr").ok


def test_a_subset_of_mixed_views_is_refused(tmp_path):
    mixup = {"recipe": "mixup:0.2", "seed": 0, "fields": ["partner", "lam"], "input_size": [8, 8]}
    params = np.array([[[1, 0.5]], [[0, 0.25]], [[0, 0.75]]], dtype=np.float32)
    writer = create_store(
        tmp_path / "mixed.zarr",
        num_samples=3,
        num_classes=5,
        encoding="float32",
        augment=mixup,
        view_params=params,
    )
    writer.write(np.arange(3), teacher_logits(3, 5))
    writer.finalize()
    with pytest.raises(ConfigError, match="partners are other samples"):
        convert_store(tmp_path / "mixed.zarr", tmp_path / "out.zarr", encoding="int8", indices=[1])
    assert not (tmp_path / "out.zarr").exists()


def test_a_token_store_converts_whole_and_by_whole_sequences(tmp_path):
    generator = np.random.default_rng(3)
    sequences = [generator.integers(0, 12, size=length) for length in (5, 2, 9, 4, 7, 3)]
    writer = create_sequence_store(
        tmp_path / "tokens.zarr",
        sequences=sequences,
        vocab_size=12,
        encoding="float16",
        chunk_rows=4,  # chunks that split sequences
        dataset={"spec": "text:notes.txt", "fingerprint": {"num_sequences": 6}},
    )
    writer.write(np.arange(6), teacher_logits(sum(len(tokens) - 1 for tokens in sequences), 12))
    writer.finalize()
    whole = convert_store(tmp_path / "tokens.zarr", tmp_path / "int8.zarr", encoding="int8")
    assert whole.num_samples == 6
    assert present(whole.fidelity).kl_at(1.0) > 0
    source = open_sequence_store(tmp_path / "tokens.zarr")
    converted = open_sequence_store(tmp_path / "int8.zarr")
    np.testing.assert_array_equal(converted.offsets, source.offsets)
    np.testing.assert_allclose(
        dense(converted.read(range(6))).numpy(), dense(source.read(range(6))).numpy(), atol=0.05
    )
    subset = convert_store(
        tmp_path / "tokens.zarr", tmp_path / "subset.zarr", encoding="float32", indices=[4, 1, 2]
    )
    assert subset.num_samples == 3
    chosen = open_sequence_store(tmp_path / "subset.zarr")
    np.testing.assert_array_equal(chosen.lengths, [2, 9, 7])
    for position, sample in enumerate([1, 2, 4]):
        np.testing.assert_array_equal(chosen.tokens(position), sequences[sample])
        np.testing.assert_array_equal(
            dense(chosen.read([position])).numpy(), dense(source.read([sample])).numpy()
        )
    assert chosen.layout == {"num_sequences": 3, "num_tokens": 15, "max_length": 9}
    for path in ("int8.zarr", "subset.zarr"):
        assert verify_store(tmp_path / path).ok
    with pytest.raises(ConfigError, match=r"holds 6 sequences"):
        convert_store(tmp_path / "tokens.zarr", tmp_path / "bad.zarr", encoding="int8", indices=[6])


def test_a_store_converts_to_and_from_object_storage(tmp_path, float16_store, s3_bucket):
    remote = f"{s3_bucket}/top4.zarr"
    result = convert_store(float16_store, remote, encoding="topk:4")
    assert result.nbytes is None  # remote
    with pytest.raises(ConfigError, match="lies inside the source store"):
        convert_store(remote, f"{remote}/inner.zarr", encoding="int8")
    convert_store(remote, tmp_path / "back.zarr", encoding="float32", indices=[0, 39])
    back = open_store(tmp_path / "back.zarr")
    assert back.metadata.extra[CONVERTED_FROM_KEY]["store"] == remote
    expected = open_store(remote).read_dense([0, 39], temperature=1.0)
    np.testing.assert_array_equal(back.read_dense([0, 1]).numpy(), expected.numpy())
    assert verify_store(remote).ok


def test_overwrite_replaces_an_existing_store_with_the_converted_one(tmp_path, float16_store):
    convert_store(float16_store, tmp_path / "out.zarr", encoding="float32")
    with pytest.raises(StoreExistsError, match="--overwrite"):
        convert_store(float16_store, tmp_path / "out.zarr", encoding="int8")
    assert open_store(tmp_path / "out.zarr").metadata.encoding == "float32"
    convert_store(float16_store, tmp_path / "out.zarr", encoding="int8", overwrite=True)
    assert open_store(tmp_path / "out.zarr").metadata.encoding == "int8"
    assert verify_store(tmp_path / "out.zarr").ok


def test_a_damaged_source_chunk_stops_the_convert_and_leaves_no_new_store(tmp_path, float16_store):
    chunk = float16_store / "logits" / "c" / "3" / "0"
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(StoreCorruptError, match="24-31"):
        convert_store(float16_store, tmp_path / "out.zarr", encoding="int8")
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("out", "options", "error", "message"),
    [
        ("source.zarr", {}, ConfigError, "is the source store itself"),
        ("source.zarr/inner.zarr", {}, ConfigError, "lies inside the source store"),
        (".", {"overwrite": True}, ConfigError, "lies around the source store"),
        ("out.zarr", {"encoding": "float8"}, SpecError, "unknown encoding"),
        ("out.zarr", {"encoding": "sampled:11"}, ConfigError, "has only 10"),
        ("out.zarr", {"encoding": "topk:10"}, ConfigError, "has only 10"),
        ("out.zarr", {"indices": [3, 40]}, ConfigError, r"outside \[0, 40\)"),
        ("out.zarr", {"indices": [3, 3]}, ConfigError, "more than once"),
        ("out.zarr", {"indices": []}, ConfigError, "no sample"),
        ("out.zarr", {"indices": [1.0]}, ConfigError, "integer sample indices"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(
    tmp_path, float16_store, out, options, error, message
):
    before = sorted(path.name for path in tmp_path.rglob("*"))
    source_digest = open_store(float16_store).content_digest()
    with pytest.raises(error, match=message):
        convert_store(float16_store, tmp_path / out, **{"encoding": "int8", **options})
    assert sorted(path.name for path in tmp_path.rglob("*")) == before
    assert open_store(float16_store).content_digest() == source_digest


def test_the_command_converts_a_dumped_store_that_then_distills(tmp_path, digits_store):
    indices = tmp_path / "chosen.txt"
    indices.write_text("5, 3\n900\n")
    converted = run_cli(
        "convert", str(digits_store), str(tmp_path / "topk.zarr"), "--encoding", "topk:4"
    )
    assert "topk:4" in converted.stdout
    assert "KL(T=1)" in converted.stdout
    result = distill(
        DistillConfig(
            student="mlp:8",
            cache=str(tmp_path / "topk.zarr"),
            epochs=1,
            out=str(tmp_path / "run"),
            device="cpu",
        )
    )
    assert result.epochs == 1
    subset = run_cli(
        "convert",
        str(digits_store),
        str(tmp_path / "subset.zarr"),
        "--encoding",
        "float16",
        "--indices",
        str(indices),
    )
    assert "N=3" in subset.stdout
    source_labels = present(open_store(digits_store).labels)
    np.testing.assert_array_equal(
        open_store(tmp_path / "subset.zarr").labels, source_labels[[3, 5, 900]]
    )
    refused = run_cli(
        "convert",
        str(digits_store),
        str(tmp_path / "topk.zarr"),
        "--encoding",
        "int8",
        check=False,
    )
    assert_one_line_error(refused, "already holds a complete store", "--overwrite")
    assert open_store(tmp_path / "topk.zarr").metadata.encoding == "topk:4"


def test_the_command_overwrites_a_part_store_with_another_subset(tmp_path, digits_store):
    indices = tmp_path / "chosen.txt"
    part = tmp_path / "part.zarr"
    for chosen, encoding in (("5, 3", "float16"), ("7, 1, 2", "int8")):
        indices.write_text(chosen)
        run_cli(
            "convert", str(digits_store), str(part), "--encoding", encoding,
            "--indices", str(indices), "--overwrite",
        )  # fmt: skip
    store = open_store(part)
    assert store.metadata.encoding == "int8"
    assert store.guard.whole(DATASET_INDICES_ARRAY).tolist() == [1, 2, 7]


def test_a_subset_records_which_samples_of_the_whole_dataset_it_holds(tmp_path, float16_store):
    convert_store(float16_store, tmp_path / "half.zarr", encoding="float16", indices=[30, 2, 9, 21])
    convert_store(
        tmp_path / "half.zarr", tmp_path / "quarter.zarr", encoding="int8", indices=[3, 1]
    )
    convert_store(tmp_path / "quarter.zarr", tmp_path / "again.zarr", encoding="float32")
    for name, expected in (("half", [2, 9, 21, 30]), ("quarter", [9, 30]), ("again", [9, 30])):
        store = open_store(tmp_path / f"{name}.zarr")
        assert store.guard.whole(DATASET_INDICES_ARRAY).tolist() == expected
    whole = convert_store(float16_store, tmp_path / "whole.zarr", encoding="int8")
    assert DATASET_INDICES_ARRAY not in open_store(whole.out).group


def test_a_part_holding_only_sample_0_verifies(tmp_path, float16_store):
    # Its dataset_indices are all zero: the array's one chunk is still written.
    convert_store(float16_store, tmp_path / "first.zarr", encoding="float16", indices=[0])
    report = verify_store(tmp_path / "first.zarr")
    assert report.ok, report.problems
    assert open_store(tmp_path / "first.zarr").guard.whole(DATASET_INDICES_ARRAY).tolist() == [0]
