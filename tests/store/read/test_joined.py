"""Joined stores: parts of one dataset read in place as one store (`kdcache concat --link`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from kdcache import DistillConfig, create_store, open_store
from kdcache.errors import StoreMismatchError, StoreNotFoundError
from kdcache.store.read.joined import JOINED_FROM_KEY, JOINED_KEY
from kdcache.store.read.reader import JoinedReader
from kdcache.store.tools.concat import concat_stores, link_stores
from kdcache.store.tools.convert import convert_store
from kdcache.store.tools.verify import verify_store
from kdcache.train.loop import distill

TEACHER = {"spec": "cnn:8", "weights_sha256": "0" * 64}
DATASET = {"spec": "digits", "split": "train", "fingerprint": {"num_samples": 12}}
AUGMENT = {"recipe": "flip", "seed": 0, "fields": ["flip"], "input_size": [8, 8]}
SPLIT = ([0, 3, 4, 9], [1, 2, 10, 11], [5, 6, 7, 8])


def whole_store(path: Path, *, views: int = 1) -> Path:
    params = (np.arange(12 * views) % 2).astype(np.float32).reshape(12, views, 1)
    writer = create_store(
        path,
        num_samples=12,
        num_classes=6,
        encoding="float32",
        labels=np.arange(12) % 6,
        chunk_rows=5,
        teacher=TEACHER,
        dataset=DATASET,
        views=views,
        augment=AUGMENT if views > 1 else None,
        view_params=params if views > 1 else None,
    )
    rows = np.random.default_rng(5).normal(size=(12 * views, 6)) * 3
    writer.write(np.arange(12 * views), rows.astype(np.float32))
    writer.finalize()
    return path


def split_store(
    tmp_path: Path, source: Path, encoding: str, *chosen: list[int], chunk_rows: int = 3
) -> list[Path]:
    paths = []
    for number, indices in enumerate(chosen):
        path = tmp_path / f"part{number}.zarr"
        convert_store(source, path, encoding=encoding, indices=indices, chunk_rows=chunk_rows)
        paths.append(path)
    return paths


@pytest.mark.parametrize(("encoding", "views"), [("float16", 1), ("topk:2", 3)])
def test_joined_parts_read_as_their_concatenated_copy(tmp_path, encoding, views):
    source = whole_store(tmp_path / "whole.zarr", views=views)
    parts = split_store(tmp_path, source, encoding, *SPLIT)
    copied = tmp_path / "all.zarr"
    concat_stores(parts, copied)
    result = link_stores(list(reversed(parts)), tmp_path / "joined.zarr")
    assert (result.num_samples, result.views, result.num_sources) == (12, views, 3)
    assert result.nbytes is not None
    assert result.nbytes < 2000
    joined, copy = open_store(tmp_path / "joined.zarr"), open_store(copied)
    assert isinstance(joined, JoinedReader)
    assert (joined.num_samples, joined.views, joined.metadata.dataset) == (12, views, DATASET)
    np.testing.assert_array_equal(joined.labels, copy.labels)
    if views > 1:
        np.testing.assert_array_equal(joined.view_params, copy.view_params)
    rows = np.random.default_rng(0).permutation(12 * views)
    for name, values in copy.feed.gather(rows).items():
        np.testing.assert_array_equal(joined.feed.gather(rows)[name], values)
    np.testing.assert_array_equal(
        joined.read_dense(rows, temperature=2.0), copy.read_dense(rows, temperature=2.0)
    )
    recorded = joined.metadata.extra[JOINED_FROM_KEY]
    assert [entry["store"] for entry in recorded] == [f"../{p.name}" for p in reversed(parts)]


def test_a_chunked_joined_feed_decodes_each_part_chunk_once_per_epoch(tmp_path):
    source = whole_store(tmp_path / "whole.zarr")
    halves = list(range(0, 12, 2)), list(range(1, 12, 2))
    parts = split_store(tmp_path, source, "float32", *halves, chunk_rows=2)
    link_stores(parts, tmp_path / "joined.zarr")
    chunk_bytes = 2 * 6 * 4  # a part's chunk: 2 rows of 6 float32; each part has 3
    joined = open_store(tmp_path / "joined.zarr", memory_budget=4 * chunk_bytes)
    feed = joined.feed
    assert feed.mode == "chunked"
    decoded = []
    for epoch in range(3):
        order = feed.epoch_order(epoch, seed=1)
        assert sorted(order.tolist()) == list(range(12))
        before = feed.chunks_decoded
        for start in range(0, 12, 4):
            feed.gather(order[start : start + 4])
        decoded.append(feed.chunks_decoded - before)
    # Two parts of three chunks each, each chunk at most once per epoch (some stay resident).
    assert decoded[0] == 6
    assert max(decoded) <= 6
    shares = [feed.epoch_order(0, seed=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(12))


def test_gaps_overlaps_and_different_parts_are_refused_and_nothing_is_written(tmp_path):
    source = whole_store(tmp_path / "whole.zarr")
    a, b, c = split_store(tmp_path, source, "float16", *SPLIT)
    out = tmp_path / "joined.zarr"
    with pytest.raises(StoreMismatchError, match=r"no store holds samples 5-8 of the dataset's 12"):
        link_stores([a, b], out)
    with pytest.raises(StoreMismatchError, match=r"both hold samples 0, 3-4, 9"):
        link_stores([a, a, b, c], out)
    convert_store(source, tmp_path / "other.zarr", encoding="int8", indices=SPLIT[2])
    with pytest.raises(StoreMismatchError, match=r"differ in their encoding"):
        link_stores([a, b, tmp_path / "other.zarr"], out)
    assert not out.exists()
    assert not (tmp_path / "joined.zarr.incoming").exists()


def test_a_missing_or_changed_part_is_refused_in_one_line(tmp_path):
    source = whole_store(tmp_path / "whole.zarr")
    a, b = split_store(tmp_path, source, "float16", list(range(6)), list(range(6, 12)))
    out = tmp_path / "joined.zarr"
    done = run_cli("concat", str(a), str(b), "--out", str(out), "--link")
    assert "linked 2 stores" in done.stdout
    assert open_store(out).num_samples == 12
    # A part written anew (another generation, even with equal rows) is not the part joined.
    shutil.rmtree(b)
    convert_store(source, b, encoding="float16", indices=list(range(6, 12)))
    with pytest.raises(StoreMismatchError, match=r"changed since it was joined \(its generation"):
        open_store(out)
    shutil.rmtree(b)
    with pytest.raises(StoreNotFoundError, match=r"joined.zarr joins a part that cannot be read"):
        open_store(out)
    run = ("--student", "mlp:8", "--out", str(tmp_path / "run"))
    refused = run_cli("distill", "--cache", str(out), *run, check=False)
    assert_one_line_error(refused, "joins a part that cannot be read")
    assert not (tmp_path / "run").exists()


def test_an_existing_output_is_kept_without_overwrite_and_replaced_with_it(tmp_path):
    source = whole_store(tmp_path / "whole.zarr")
    a, b = split_store(tmp_path, source, "float16", list(range(6)), list(range(6, 12)))
    out = tmp_path / "joined.zarr"
    link_stores([a, b], out)
    first = json.loads((out / "zarr.json").read_text())["attributes"][JOINED_KEY]
    refused = run_cli("concat", str(a), str(b), "--out", str(out), "--link", check=False)
    assert_one_line_error(refused, "already exists; pass --overwrite")
    link_stores([b, a], out, overwrite=True)
    second = json.loads((out / "zarr.json").read_text())["attributes"][JOINED_KEY]
    assert first["generation"] != second["generation"]
    assert [p["store"] for p in second["parts"]] == ["../part1.zarr", "../part0.zarr"]


def test_a_folder_of_parts_and_their_joined_store_moves_as_one(tmp_path):
    folder = tmp_path / "stores"
    folder.mkdir()
    source = whole_store(tmp_path / "whole.zarr")
    a, b = split_store(folder, source, "float16", list(range(6)), list(range(6, 12)))
    run_cli("concat", str(a), str(b), "--out", str(folder / "joined.zarr"), "--link")
    expected = open_store(folder / "joined.zarr").read(np.arange(12))
    moved = tmp_path / "moved"
    folder.rename(moved)
    torch.testing.assert_close(open_store(moved / "joined.zarr").read(np.arange(12)), expected)
    # A joined store written before relative paths names its parts by absolute paths.
    path = moved / "joined.zarr" / "zarr.json"
    meta = json.loads(path.read_text())
    for entry in meta["attributes"][JOINED_KEY]["parts"]:
        entry["store"] = str((moved / "joined.zarr" / entry["store"]).resolve())
    path.write_text(json.dumps(meta))
    torch.testing.assert_close(open_store(moved / "joined.zarr").read(np.arange(12)), expected)


def test_parts_on_object_storage_are_read_in_place(tmp_path, s3_bucket):
    source = whole_store(tmp_path / "whole.zarr")
    remote = [f"{s3_bucket}/part{number}.zarr" for number in range(2)]
    for path, indices in zip(remote, ([1, 3, 5, 7, 9, 11], [0, 2, 4, 6, 8, 10]), strict=True):
        convert_store(source, path, encoding="float16", indices=indices)
    link_stores(remote, f"{s3_bucket}/joined.zarr")
    joined, whole = open_store(f"{s3_bucket}/joined.zarr"), open_store(source)
    rows = np.arange(12)
    np.testing.assert_allclose(
        joined.read_dense(rows).numpy(), whole.read_dense(rows).numpy(), rtol=1e-3, atol=1e-2
    )
    assert [entry["store"] for entry in joined.metadata.extra[JOINED_FROM_KEY]] == remote


def test_verify_decodes_every_part_and_inspect_lists_them(tmp_path):
    source = whole_store(tmp_path / "whole.zarr")
    a, b = split_store(tmp_path, source, "float16", list(range(6)), list(range(6, 12)))
    out = tmp_path / "joined.zarr"
    link_stores([a, b], out)
    report = verify_store(out)
    assert report.ok
    assert report.chunks_checked == 4
    assert "a joined store: 2 parts read in place" in report.notes[0]
    shown = run_cli("inspect", str(out)).stdout
    assert "part 1:" in shown
    assert str(b.resolve()) in shown
    assert "6 samples" in shown
    chunk = b / "logits" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")  # a damaged row chunk of part 1
    damaged = verify_store(out)
    assert not damaged.ok
    assert damaged.problems[0].startswith(f"part {b.resolve()}: array 'logits': chunks fail")


def load_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def same_student(a: Path, b: Path) -> bool:
    left, right = load_state(a / "last.pt"), load_state(b / "last.pt")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a_student_from_joined_parts_equals_one_from_their_concatenated_copy(
    tmp_path, digits_store
):
    count = open_store(digits_store).num_samples
    halves = list(range(0, count, 2)), list(range(1, count, 2))
    parts = [tmp_path / "even.zarr", tmp_path / "odd.zarr"]
    for path, indices in zip(parts, halves, strict=True):
        convert_store(digits_store, path, encoding="float32", indices=indices)
    concat_stores(parts, tmp_path / "all.zarr")
    link_stores(parts, tmp_path / "joined.zarr")
    common: dict[str, Any] = dict(
        student="mlp:16", epochs=2, batch_size=64, device="cpu", temperature=3.0
    )
    for name, seed in (("all", 3), ("joined", 3), ("seed4", 4)):
        store = tmp_path / ("all.zarr" if name == "all" else "joined.zarr")
        distill(DistillConfig(cache=str(store), out=str(tmp_path / name), seed=seed, **common))
    assert same_student(tmp_path / "all", tmp_path / "joined")
    record = json.loads((tmp_path / "joined/config.json").read_text())
    joined_from = record["resolved"]["store"]["extra"][JOINED_FROM_KEY]
    assert [entry["store"] for entry in joined_from] == [f"../{p.name}" for p in parts]
    # Another seed gives another student: the comparison can fail.
    assert not same_student(tmp_path / "joined", tmp_path / "seed4")


def test_a_joined_store_is_not_packed(tmp_path):
    source = whole_store(tmp_path / "whole.zarr")
    a, b = split_store(tmp_path, source, "float16", list(range(6)), list(range(6, 12)))
    link_stores([a, b], tmp_path / "joined.zarr")
    refused = run_cli("pack", str(tmp_path / "joined.zarr"), str(tmp_path / "j.zip"), check=False)
    assert_one_line_error(refused, "is a joined store, which reads its parts in place")
    assert not (tmp_path / "j.zip").exists()
