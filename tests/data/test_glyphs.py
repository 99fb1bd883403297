"""Tests for the ``glyphs`` dataset kind: determinism, distinct classes, split, cache, errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from kdcache import DistillConfig, DumpConfig, TrainConfig, distill, dump_teacher, train
from kdcache.data.datasets import (
    build_dataset,
    canonical_dataset_spec,
    dataset_fingerprint,
    glyph_render,
    glyphs,
)
from kdcache.errors import ConfigError, SpecError

TINY = "glyphs:20:16:4"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty cache folder, and no split kept in memory from an earlier test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(glyphs.CACHE_DIR_ENV, str(folder))
    glyphs.glyph_samples.cache_clear()
    yield folder
    glyphs.glyph_samples.cache_clear()


def _cached_files(cache: Path) -> list[Path]:
    return sorted((cache / "glyphs").glob("*.npz"))


def test_a_tiny_spec_builds_both_splits(cache):
    train_set, test_set = build_dataset(TINY), build_dataset(TINY, split="test")
    assert (len(train_set), len(test_set)) == (20 * 4, 20 * glyphs.TEST_PER_CLASS)
    for dataset in (train_set, test_set):
        assert (dataset.num_classes, dataset.in_channels) == (20, 1)
        assert dataset.class_names == tuple("0123456789ABCDEFGHIJ")
        x, y = dataset[len(dataset) - 1]
        assert x.dtype == torch.float32
        assert x.shape == (1, 16, 16)
        assert y == 19
        assert float(x.min()) >= 0.0
        assert float(x.max()) <= 1.0
        assert float(x.sum()) > 2.0  # ink was drawn
        assert np.bincount(dataset.labels).tolist() == [len(dataset) // 20] * 20
        assert dataset.with_inputs("uint8")[3][0].dtype == torch.uint8
        normalization = dataset.normalization
        assert normalization is not None
        assert torch.equal(normalization(dataset.with_inputs("uint8")[3][0]), dataset[3][0])


def test_drawing_twice_gives_the_same_bytes_and_fingerprint(cache, tmp_path, monkeypatch):
    first = build_dataset(TINY)
    first_pixels = np.stack([first.with_inputs("uint8")[i][0].numpy() for i in range(80)])
    monkeypatch.setenv(glyphs.CACHE_DIR_ENV, str(tmp_path / "another"))
    glyphs.glyph_samples.cache_clear()
    again = build_dataset(TINY)
    again_pixels = np.stack([again.with_inputs("uint8")[i][0].numpy() for i in range(80)])
    assert np.array_equal(first_pixels, again_pixels)
    assert dataset_fingerprint(first) == dataset_fingerprint(again)
    # Samples differ from each other: the draws are per sample.
    assert len({pixels.tobytes() for pixels in first_pixels}) == 80


def test_a_sample_does_not_depend_on_classes_or_per_class(cache):
    small = build_dataset("glyphs:20:16:2").with_inputs("uint8")
    large = build_dataset("glyphs:21:16:4").with_inputs("uint8")
    for label in range(20):
        for k in range(2):
            assert torch.equal(small[label * 2 + k][0], large[label * 4 + k][0])
    # The test split holds the same samples whatever PER_CLASS is: one file serves both.
    assert torch.equal(
        build_dataset("glyphs:20:16:2", split="test")[77][0],
        build_dataset("glyphs:20:16:4", split="test")[77][0],
    )


def test_the_split_is_fixed_and_train_and_test_share_no_image(cache):
    train_set = build_dataset(TINY).with_inputs("uint8")
    test_set = build_dataset(TINY, split="test").with_inputs("uint8")
    train_images = {train_set[i][0].numpy().tobytes() for i in range(len(train_set))}
    test_images = {test_set[i][0].numpy().tobytes() for i in range(len(test_set))}
    assert not train_images & test_images


def test_classes_are_told_apart_by_a_quarter_of_their_faces(cache):
    classes = glyph_render.glyph_classes(20)
    assert classes == tuple("0123456789ABCDEFGHIJ")
    references = glyph_render._references(list(classes))
    shape = (len(classes), len(classes))
    shared, apart = np.zeros(shape, int), np.zeros(shape, int)
    for face_pixels in references.values():
        face_shared, face_apart = glyph_render._told_apart(face_pixels, face_pixels, shape)
        shared += face_shared
        apart += face_apart
    off_diagonal = ~np.eye(len(classes), dtype=bool)
    assert (apart[off_diagonal] >= glyph_render.TOLD_APART_SHARE * shared[off_diagonal]).all()


def test_look_alikes_across_scripts_are_dropped_where_few_faces_tell_them_apart():
    selection = glyph_render._Selection()
    # Greek capital alpha and Cyrillic capital a are Latin A in most faces; digit zero is not O.
    selection.candidates = ["A", "\u0391", "\u0410", "O", "0", "\u039f", "l", "I", "1"]
    selection.extend_to(10)
    assert selection.classes == ["A", "O", "0", "l", "I", "1"]


def test_the_cache_is_read_and_a_damaged_file_is_drawn_again(cache):
    drawn = build_dataset(TINY).with_inputs("uint8")
    (path,) = [p for p in _cached_files(cache) if "-train-" in p.name]
    with np.load(path) as data:
        images, labels, codes = data["images"].copy(), data["labels"], data["codes"]
    # A file that passes its digest is used as it is: put other (valid) pixels in it.
    images[0] = 255 - images[0]
    np.savez(
        path,
        images=images,
        labels=labels,
        codes=codes,
        sha256=np.array(glyphs._digest(images, labels, codes)),
    )
    glyphs.glyph_samples.cache_clear()
    assert np.array_equal(build_dataset(TINY).with_inputs("uint8")[0][0].numpy(), images[0])
    # A file that fails its digest (or cannot be read) is drawn again, and replaced.
    for damage in (b"not a zip", path.read_bytes()[:-100]):
        path.write_bytes(damage)
        glyphs.glyph_samples.cache_clear()
        assert torch.equal(build_dataset(TINY).with_inputs("uint8")[0][0], drawn[0][0])
        assert glyphs._load(path) is not None


@pytest.mark.parametrize(
    "planted",
    [
        {"labels": lambda labels: labels[::-1].copy()},
        {"codes": lambda codes: np.full_like(codes, 0x110000)},
        {"images": lambda images: images[:-1].copy()},
    ],
    ids=["labels", "codes", "shape"],
)
def test_a_planted_file_that_passes_its_digest_but_not_its_name_is_drawn_again(cache, planted):
    drawn = build_dataset(TINY).with_inputs("uint8")
    (path,) = [p for p in _cached_files(cache) if "-train-" in p.name]
    with np.load(path) as data:
        arrays = {name: data[name].copy() for name in ("images", "labels", "codes")}
    for name, change in planted.items():
        arrays[name] = change(arrays[name])
    np.savez(path, **arrays, sha256=np.array(glyphs._digest(*arrays.values())))
    glyphs.glyph_samples.cache_clear()
    rebuilt = build_dataset(TINY).with_inputs("uint8")
    assert [rebuilt[i][1] for i in (0, 79)] == [drawn[i][1] for i in (0, 79)]
    assert torch.equal(rebuilt[0][0], drawn[0][0])


def test_an_unwritable_cache_leaves_the_dataset_in_memory(cache):
    cache.mkdir()
    (cache / "glyphs").write_text("a file where the folder would go")
    assert len(build_dataset(TINY)) == 80
    assert (cache / "glyphs").read_text() == "a file where the folder would go"


@pytest.mark.parametrize(
    ("spec", "error", "fragment"),
    [
        ("glyphs", SpecError, "glyphs:CLASSES[:SIZE[:PER_CLASS]]"),
        ("glyphs:ten", SpecError, "2 <= CLASSES"),
        ("glyphs:20:16:4:1", SpecError, "8 <= SIZE <= 256"),
        ("glyphs:-3", SpecError, "glyphs:CLASSES"),
        ("glyphs:1", ConfigError, "2 <= CLASSES"),
        ("glyphs:20:4", ConfigError, "8 <= SIZE <= 256"),
        ("glyphs:20:16:0", ConfigError, "1 <= PER_CLASS <= 100,000"),
        ("glyphs:2000:256:100000", ConfigError, "at most 4 GiB"),
    ],
)
def test_bad_specs_are_refused_naming_the_valid_range(spec, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)) as raised:
        build_dataset(spec)
    assert "\n" not in str(raised.value)


def test_the_canonical_spec_spells_out_the_defaults():
    assert canonical_dataset_spec("glyphs:100") == "glyphs:100:32:100"
    assert canonical_dataset_spec("glyphs:100:16") == "glyphs:100:16:100"
    assert canonical_dataset_spec("glyphs:100:16:5") == "glyphs:100:16:5"
    assert canonical_dataset_spec("glyphs:x") == "glyphs:x"


def test_the_cli_refuses_a_bad_spec_in_one_line(tmp_path):
    result = run_cli(
        "train",
        "--model",
        "mlp:8",
        "--dataset",
        "glyphs:20:4",
        "--out",
        str(tmp_path / "r"),
        check=False,
    )
    assert_one_line_error(result, "SIZE=4", "8 <= SIZE <= 256")


def test_train_dump_and_distill_from_the_cache(cache, tmp_path):
    teacher = train(
        TrainConfig(model="mlp:16", dataset=TINY, out=str(tmp_path / "teacher"), epochs=2)
    )
    store = tmp_path / "teacher.zarr"
    dump_teacher(
        DumpConfig(weights=str(tmp_path / "teacher" / "best.pt"), out=str(store), device="cpu")
    )
    student = distill(
        DistillConfig(student="mlp:8", cache=str(store), out=str(tmp_path / "student"), epochs=1)
    )
    for result in (teacher, student):
        assert result.metric == "val_acc"
        assert 0.0 <= result.best <= 100.0
