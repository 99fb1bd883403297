"""Transfer sets: a subset of the cached samples, classes left out, an unlabeled pool."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from narrowing import logit_feed, present

from kdcache import DistillConfig, DumpConfig, create_store, open_store
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError
from kdcache.store.read.logit_feed import LogitFeed
from kdcache.train.loop import distill
from kdcache.train.transfer import TransferSampler, read_indices, transfer_rows

DIGITS_TRAIN = 1437


def config(**changes) -> DistillConfig:
    return DistillConfig(**{"student": "mlp:16", "cache": "s.zarr", "out": "run", **changes})


def transfer(**changes):
    return transfer_rows(config(**changes), build_dataset("digits", split="train"))


def test_indices_and_excluded_classes_select_the_transfer_set(tmp_path):
    labels = build_dataset("digits", split="train").labels
    assert transfer() is None
    np.testing.assert_array_equal(transfer(indices=[9, 2, 700]), [2, 9, 700])
    rows = transfer(exclude_classes=(3, 5))
    np.testing.assert_array_equal(rows, np.flatnonzero((labels != 3) & (labels != 5)))
    both = transfer(indices=list(range(100)), exclude_classes=[3])
    np.testing.assert_array_equal(both, np.flatnonzero(labels[:100] != 3))
    np.save(tmp_path / "idx.npy", np.array([4, 1, 8]))
    (tmp_path / "idx.txt").write_text("4, 1\n8\n")
    for name in ("idx.npy", "idx.txt"):
        np.testing.assert_array_equal(read_indices(str(tmp_path / name)), [4, 1, 8])
        np.testing.assert_array_equal(transfer(indices=str(tmp_path / name)), [1, 4, 8])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"indices": [0, DIGITS_TRAIN]}, r"outside \[0, 1437\)"),
        ({"indices": [3, 4, 3]}, "lists sample 3 more than once"),
        ({"exclude_classes": (10,)}, "class 10 but dataset 'digits' has classes 0 to 9"),
        ({"exclude_classes": tuple(range(10))}, "the transfer set is empty"),
        ({"indices": "/nonexistent/idx.txt"}, "--indices file /nonexistent/idx.txt not found"),
    ],
)
def test_bad_transfer_sets_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        transfer(**changes)


def test_an_unreadable_index_file_names_the_bad_token(tmp_path):
    (tmp_path / "idx.txt").write_text("1 2 x3\n")
    with pytest.raises(ConfigError, match="holds 'x3'; expected integer sample indices"):
        read_indices(str(tmp_path / "idx.txt"))
    with pytest.raises(ConfigError, match="exclude_classes must be class indices >= 0"):
        config(exclude_classes=(-1,))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"1 2\n--5\n", "line 2 holds '--5'; expected integer sample indices"),
        ("1\n\u00b2\n".encode(), "line 2 holds byte 0xc2, which is not ASCII text"),
        ("4, 1\n\xe9t\xe9\n".encode("latin-1"), "line 2 holds byte 0xe9, which is not ASCII"),
        (bytes(range(256)), r"line 1 holds '\\x00\\x01"),
        (b"3\n99999999999999999999\n", "line 2 holds '99999999999999999999', beyond any sample"),
        (b"7" * 5000, r"line 1 holds '7{32}\.\.\.', beyond any sample index"),
    ],
    ids=["double-minus", "superscript", "latin-1", "binary", "huge", "thousands-of-digits"],
)
def test_index_files_that_are_not_ascii_integers_are_refused_naming_the_line(
    tmp_path, content, message
):
    (tmp_path / "idx.txt").write_bytes(content)
    with pytest.raises(ConfigError, match=f"--indices file {tmp_path}/idx.txt {message}"):
        read_indices(str(tmp_path / "idx.txt"))


def test_index_files_read_any_ascii_spacing_and_refuse_unreadable_arrays(tmp_path):
    (tmp_path / "idx.txt").write_bytes(b"1,2,\r\n3\t4\n+5 -0 007\n")
    np.testing.assert_array_equal(read_indices(str(tmp_path / "idx.txt")), [1, 2, 3, 4, 5, 0, 7])
    np.save(tmp_path / "big.npy", np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(ConfigError, match="holds 18446744073709551615, beyond any sample index"):
        read_indices(str(tmp_path / "big.npy"))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ConfigError, match=r"cannot read --indices file .*junk.npy as a .npy array"):
        read_indices(str(tmp_path / "junk.npy"))
    with pytest.raises(ConfigError, match="indices must be a sequence of integers"):
        config(indices=np.array([2**63], dtype=np.uint64))


def test_the_sampler_visits_each_transfer_sample_once_per_epoch(tmp_path):
    rows = np.arange(0, 300, 3)
    shuffled = TransferSampler(rows, seed=0)
    first, second = list(shuffled), list(shuffled)
    assert sorted(first) == sorted(second) == rows.tolist()
    assert first != second
    writer = create_store(tmp_path / "s.zarr", num_samples=300, num_classes=4, chunk_rows=20)
    writer.write(np.arange(300), np.zeros((300, 4), dtype=np.float32))
    writer.finalize()
    reader = open_store(tmp_path / "s.zarr")
    feed = LogitFeed(reader, memory_budget=logit_feed(reader.feed).chunk_nbytes * 4)
    assert feed.mode == "chunked"
    assert feed.window_chunks == 2
    chunked = list(TransferSampler(rows, seed=0, feed=feed))
    assert sorted(chunked) == rows.tolist()
    # the feed's chunk-aware order, restricted to the transfer set: window after window of
    # two chunks, so each chunk is decoded once per epoch
    chunks = np.asarray(chunked) // 20
    for chunk in range(15):
        where = np.flatnonzero(chunks == chunk)
        assert len(set(chunks[where[0] : where[-1] + 1].tolist())) <= 2


def test_distill_on_a_transfer_set_records_it_and_validates_on_the_whole_split(
    tmp_path, digits_store
):
    result = distill(
        DistillConfig(
            student="mlp:16",
            cache=str(digits_store),
            exclude_classes=(3, 5),
            indices=tuple(range(0, DIGITS_TRAIN, 2)),
            epochs=2,
            out=str(tmp_path),
        )
    )
    saved = json.loads((tmp_path / "config.json").read_text())
    labels = build_dataset("digits", split="train").labels[::2]
    assert saved["exclude_classes"] == [3, 5]
    assert len(saved["indices"]) == 719
    assert saved["resolved"]["transfer"]["num_samples"] == int(
        ((labels != 3) & (labels != 5)).sum()
    )
    assert saved["resolved"]["transfer"]["unlabeled_samples"] == 0
    # validated on all 360 test samples, 3s and 5s included: neither class was ever seen, so at
    # most 360 - (their test samples) can be right
    test_labels = build_dataset("digits", split="test").labels
    seen_classes = ((test_labels != 3) & (test_labels != 5)).sum()
    assert 0 < result.best <= 100.0 * seen_classes / len(test_labels) + 1e-9


@pytest.fixture(scope="module")
def unlabeled_store(tmp_path_factory, digits_teacher):
    """The digits teacher's logits on the train split with its labels dropped."""
    out = tmp_path_factory.mktemp("unlabeled") / "pool.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            dataset="unlabeled:digits",
            out=str(out),
            encoding="float32",
            device="cpu",
        )
    )
    return out


def test_an_unlabeled_pool_distils_with_alpha_1_only(tmp_path, unlabeled_store, digits_store):
    reader = open_store(unlabeled_store)
    assert reader.labels is None
    assert present(reader.metadata.dataset)["spec"] == "unlabeled:digits"
    assert (build_dataset("unlabeled:digits").labels == -1).all()
    with pytest.raises(
        ConfigError, match=r"1437 samples of the transfer set have no label.*--alpha 1"
    ):
        distill(DistillConfig(student="mlp:16", cache=str(unlabeled_store), out=str(tmp_path)))
    assert not (tmp_path / "config.json").exists()  # refused before anything is written
    common: dict[str, Any] = dict(student="mlp:16", alpha=1.0, epochs=2, seed=4)
    unlabeled = distill(
        DistillConfig(cache=str(unlabeled_store), out=str(tmp_path / "u"), **common)
    )
    labeled = distill(DistillConfig(cache=str(digits_store), out=str(tmp_path / "l"), **common))
    saved = json.loads((tmp_path / "u" / "config.json").read_text())
    assert saved["resolved"]["transfer"]["unlabeled_samples"] == DIGITS_TRAIN
    # alpha 1 never reads a label: the same teacher rows train the same student, validated on
    # digits' labelled test split
    assert unlabeled.best == labeled.best
    state = torch.load(tmp_path / "u" / "last.pt", weights_only=True)["state_dict"]
    reference = torch.load(tmp_path / "l" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(state[name], reference[name]) for name in state)
    with pytest.raises(ConfigError, match="--exclude-classes needs labels"):
        distill(
            DistillConfig(
                student="mlp:16",
                cache=str(unlabeled_store),
                alpha=1.0,
                exclude_classes=(1,),
                out=str(tmp_path / "x"),
            )
        )


def test_plain_training_refuses_an_unlabeled_dataset(tmp_path):
    from kdcache import TrainConfig
    from kdcache.train.loop import train

    with pytest.raises(ConfigError, match="train needs labels but 1437 samples"):
        train(TrainConfig(model="mlp:8", dataset="unlabeled:digits", out=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()


def test_transfer_set_options_through_the_cli(tmp_path, digits_store, unlabeled_store):
    (tmp_path / "idx.txt").write_text(" ".join(map(str, range(0, DIGITS_TRAIN, 4))))
    result = run_cli(
        "distill",
        "--cache",
        str(digits_store),
        "--student",
        "mlp:8",
        "--epochs",
        "1",
        "--indices",
        str(tmp_path / "idx.txt"),
        "--exclude-classes",
        "3,5",
        "--out",
        str(tmp_path / "run"),
    )
    assert "best val_acc" in result.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["indices"] == str(tmp_path / "idx.txt")
    assert saved["exclude_classes"] == [3, 5]
    refused = run_cli(
        "distill",
        "--cache",
        str(unlabeled_store),
        "--student",
        "mlp:8",
        "--out",
        str(tmp_path / "refused"),
        check=False,
    )
    assert_one_line_error(refused, "have no label", "--alpha 1")
    assert not (tmp_path / "refused").exists()


def test_every_run_of_a_sweep_shares_the_transfer_set():
    from kdcache.config import SweepConfig

    sweep = SweepConfig(
        cache="s.zarr",
        student="mlp",
        out="sweep",
        temperatures=(2.0, 4.0),
        indices="idx.npy",
        exclude_classes=(3, 5),
    )
    assert [(run.indices, run.exclude_classes) for run in sweep.runs()] == [
        ("idx.npy", (3, 5)),
        ("idx.npy", (3, 5)),
    ]
