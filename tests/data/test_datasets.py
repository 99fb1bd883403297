"""Tests for kdcache.data.datasets: specs, splits, determinism, errors and fingerprints."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcache.choices import SPLITS
from kdcache.data.datasets import (
    DATASET_KINDS,
    LabeledDataset,
    build_dataset,
    compare_fingerprints,
    dataset_fingerprint,
)
from kdcache.errors import ConfigError, DatasetNotFoundError, SpecError


def _items(ds: LabeledDataset, indices) -> list[tuple[torch.Tensor, int]]:
    return [ds[i] for i in indices]


def test_digits_sizes_shapes_and_labels():
    train, test = build_dataset("digits"), build_dataset("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    for ds in (train, test):
        assert ds.num_classes == 10
        assert ds.in_channels == 1
        assert ds.spec == "digits"
        assert ds.labels.dtype == np.int64
        assert len(ds.labels) == len(ds)
        x, y = ds[0]
        assert x.dtype == torch.float32
        assert x.shape == (1, 8, 8)
        assert isinstance(y, int)
        assert float(x.min()) >= 0.0
        assert float(x.max()) <= 1.0
        assert [ds[i][1] for i in range(0, len(ds), 37)] == ds.labels[::37].tolist()
    assert train.split == "train"
    assert test.split == "test"
    assert "x/16" in train.transform_description


def test_digits_split_is_stratified_and_fixed():
    train, test = build_dataset("digits"), build_dataset("digits", split="test")
    train_frac = np.bincount(train.labels, minlength=10) / len(train)
    test_frac = np.bincount(test.labels, minlength=10) / len(test)
    assert np.abs(train_frac - test_frac).max() < 0.01
    again = build_dataset("digits", split="test")
    assert np.array_equal(again.labels, test.labels)
    assert torch.equal(again[123][0], test[123][0])


def test_items_are_deterministic_and_private_copies():
    ds = build_dataset("digits")
    x1, _ = ds[5]
    x1.add_(100)  # must not leak into the dataset
    assert torch.equal(ds[5][0], build_dataset("digits")[5][0])
    assert float(ds[5][0].max()) <= 1.0
    ds.labels[0] = 99  # each dataset owns its label array
    assert build_dataset("digits").labels[0] != 99


def test_index_bounds():
    ds = build_dataset("fake:3")
    assert torch.equal(ds[-1][0], ds[2][0])
    with pytest.raises(IndexError):
        ds[3]
    assert len(list(iter(ds))) == 3


def test_fake_sizes_labels_and_splits():
    train, test = build_dataset("fake:50"), build_dataset("fake:50", split="test")
    assert (len(train), len(test)) == (50, 10)
    assert len(build_dataset("fake:3", split="test")) == 1
    x, _ = train[0]
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.float32
    assert train.num_classes == 10
    assert train.in_channels == 3
    for ds in (train, test):
        assert ds.labels.dtype == np.int64
        assert ds.labels.tolist() == [ds[i][1] for i in range(len(ds))]
    assert not torch.equal(train[0][0], test[0][0])
    assert torch.equal(train[7][0], build_dataset("fake:50")[7][0])
    # The labels were reproduced without touching the global RNG.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _ = build_dataset("fake:20").labels
    assert torch.equal(torch.rand(3), expected)


def test_fake_items_are_torchvisions_and_leave_the_global_generator_alone():
    """The same images and labels as torchvision's FakeData, from a generator of their own: a
    loader thread reading them never moves the training thread's draws."""
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T

    ours = build_dataset("fake:30:8:5", split="test")
    theirs = tv_datasets.FakeData(
        size=len(ours),
        image_size=(3, 8, 8),
        num_classes=5,
        transform=T.ToTensor(),
        random_offset=30,
    )
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    items = [ours[i] for i in range(len(ours))]
    assert torch.equal(torch.rand(3), expected)
    for (image, label), (their_image, their_label) in zip(items, theirs, strict=True):
        assert torch.equal(image, their_image)
        assert label == their_label


def test_fake_extended_form():
    ds = build_dataset("fake:12:16:100")
    assert len(ds) == 12
    assert ds.num_classes == 100
    assert ds[0][0].shape == (3, 16, 16)
    assert ds.labels.tolist() == [ds[i][1] for i in range(12)]
    assert max(ds.labels) < 100


def _png_tree(root: Path, split: str, classes=("cat", "dog"), per_class: int = 3) -> None:
    rng = np.random.default_rng(len(split))
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / c / f"{k}.png")


def test_imagefolder_train_and_val(tmp_path):
    _png_tree(tmp_path, "train")
    _png_tree(tmp_path, "val")
    train = build_dataset(f"imagefolder:{tmp_path}:16")
    test = build_dataset(f"imagefolder:{tmp_path}:16", split="test")
    assert len(train) == len(test) == 6
    assert train.num_classes == 2
    assert train.in_channels == 3
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = train[4]
    assert x.shape == (3, 16, 16)
    assert x.dtype == torch.float32
    assert y == 1
    assert torch.equal(train[4][0], build_dataset(f"imagefolder:{tmp_path}:16")[4][0])
    assert "Resize(16)" in train.transform_description


def test_imagefolder_default_size_and_test_folder(tmp_path):
    _png_tree(tmp_path, "train")
    _png_tree(tmp_path, "test", classes=("dog",), per_class=2)
    assert build_dataset(f"imagefolder:{tmp_path}")[0][0].shape == (3, 224, 224)
    test = build_dataset(f"imagefolder:{tmp_path}", split="test")
    # Val labels use the train split's class indices even when a class folder is absent.
    assert test.num_classes == 2
    assert test.labels.tolist() == [1, 1]


def test_imagefolder_missing_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "train"))):
        build_dataset(f"imagefolder:{tmp_path}")
    _png_tree(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match=r"val or .*test"):
        build_dataset(f"imagefolder:{tmp_path}", split="test")
    _png_tree(tmp_path, "val", classes=("cat", "emu"))
    with pytest.raises(DatasetNotFoundError, match="emu"):
        build_dataset(f"imagefolder:{tmp_path}", split="test")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no usable images for the imagefolder train"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"imagefolder test split: .*class folder"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}", split="test")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw")],
)
def test_torchvision_sets_absent(tmp_path, kind, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(f"{kind}:{tmp_path}")
    message = str(info.value)
    assert str(tmp_path / expected) in message
    assert "never downloads" in message
    assert "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing was fetched or created


@pytest.mark.parametrize(
    ("spec", "error", "fragment"),
    [
        ("cifar11:/x", SpecError, "valid kinds: digits, fake"),
        ("", SpecError, "valid kinds"),
        ("fake:abc", SpecError, "fake:N or fake:N:SIZE:CLASSES"),
        ("fake:1:2:3:4", SpecError, "fake:N or fake:N:SIZE:CLASSES"),
        ("fake", SpecError, "fake:N"),
        ("fake:0", ConfigError, "N >= 1"),
        ("fake:5:0", ConfigError, "SIZE >= 1"),
        ("fake:5:8:1", ConfigError, "CLASSES >= 2"),
        ("cifar10", SpecError, "cifar10:ROOT"),
        ("mnist:", SpecError, "mnist:ROOT"),
        ("imagefolder", SpecError, "imagefolder:PATH"),
        ("imagefolder:/x:0", ConfigError, "SIZE=0"),
        ("digits:5", SpecError, "expected 'digits'"),
    ],
)
def test_bad_specs(spec, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        build_dataset(spec)
    assert "\n" not in str(info.value)


def test_bad_split():
    with pytest.raises(ConfigError, match="train, test"):
        build_dataset("digits", split="val")


def _mnist_files(root: Path, per_split: int = 4) -> None:
    """MNIST's four raw idx files, with ``per_split`` random 28x28 images a split."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(per_split, 28, 28), dtype=np.uint8)
        labels = np.arange(per_split, dtype=np.uint8) % 10
        header = np.array([0x00000803, per_split, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([0x00000801, per_split], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


#: Kinds whose files torchvision checks against published checksums: only the real, downloaded
#: files build (their refusal when absent is tested above).
NEEDS_PUBLISHED_FILES = {"cifar10", "cifar100"}


def _tiny_spec(kind: str, root: Path) -> str:
    if kind == "imagefolder":
        _png_tree(root, "train")
        _png_tree(root, "val")
        return f"imagefolder:{root}:8"
    if kind == "mnist":
        _mnist_files(root)
        return f"mnist:{root}"
    return {
        "digits": "digits",
        "fake": "fake:6:8:3",
        "glyphs": "glyphs:3:8:2",
        "synthetic": "synthetic:6:8:3",
        "unlabeled": "unlabeled:fake:6:8:3",
    }[kind]


@pytest.mark.parametrize("kind", sorted(set(DATASET_KINDS) - NEEDS_PUBLISHED_FILES))
@pytest.mark.parametrize("split", SPLITS)
def test_every_registered_kind_builds_a_tiny_dataset(tmp_path, kind, split):
    dataset = build_dataset(_tiny_spec(kind, tmp_path), split=split)
    x, y = dataset[0]
    assert x.dtype == torch.float32
    assert x.shape[0] == dataset.in_channels
    assert len(dataset) == len(dataset.labels)
    assert dataset.num_classes >= 2
    assert y == dataset.labels[0]
    assert (y == -1) == (kind == "unlabeled")


def test_an_unknown_kind_names_what_was_given_and_every_registered_kind():
    with pytest.raises(SpecError, match="'cifar11'.*" + ", ".join(DATASET_KINDS)):
        build_dataset("cifar11:/x")


def test_unlabeled_keeps_the_inputs_and_drops_every_label():
    from kdcache.data.datasets import labeled_spec

    pool, digits = (
        build_dataset("unlabeled:digits", split="test"),
        build_dataset("digits", split="test"),
    )
    assert len(pool) == len(digits)
    assert pool.num_classes == 10
    assert pool.in_channels == 1
    assert (pool.labels == -1).all()
    assert pool[5][1] == -1
    assert torch.equal(pool[5][0], digits[5][0])
    assert labeled_spec("unlabeled:digits") == "digits"
    assert labeled_spec("fake:10") == "fake:10"
    with pytest.raises(SpecError, match="expected unlabeled:SPEC"):
        build_dataset("unlabeled:")


def test_fingerprint_equal_for_same_dataset():
    fp = dataset_fingerprint(build_dataset("digits"))
    assert fp == dataset_fingerprint(build_dataset("digits"))
    assert compare_fingerprints(fp, fp) == []
    assert fp["num_samples"] == 1437
    assert fp["num_classes"] == 10
    assert fp["input_indices"][0] == 0
    assert fp["input_indices"][-1] == 1436
    assert len(fp["input_indices"]) == len(set(fp["input_indices"])) == 16
    small = dataset_fingerprint(build_dataset("fake:3"), num_input_samples=16)
    assert small["input_indices"] == [0, 1, 2]


def test_fingerprint_differences():
    digits = dataset_fingerprint(build_dataset("digits"))
    fake = dataset_fingerprint(build_dataset("fake:1000"))
    diffs = compare_fingerprints(digits, fake)
    assert diffs[0] == "num_samples: store has 1437, dataset has 1000"
    assert any(d.startswith("labels differ (sha256 ") for d in diffs)
    # Same size and labels, different inputs.
    train = build_dataset("fake:20")
    shifted = dict(dataset_fingerprint(train), inputs_sha256="0" * 64)
    assert compare_fingerprints(shifted, dataset_fingerprint(train)) == [
        "inputs differ at the sampled indices"
    ]
    relabeled = dict(dataset_fingerprint(train), labels_sha256="ab12" + "0" * 60)
    actual = dataset_fingerprint(train)
    assert compare_fingerprints(relabeled, actual) == [
        f"labels differ (sha256 ab1200000000… vs {actual['labels_sha256'][:12]}…)"
    ]
    fewer = dataset_fingerprint(train, num_input_samples=4)
    assert "different indices" in compare_fingerprints(fewer, dataset_fingerprint(train))[0]


def test_fingerprint_tolerates_older_stores():
    fp = dataset_fingerprint(build_dataset("fake:20"))
    old = {k: fp[k] for k in ("num_samples", "num_classes", "labels_sha256")}
    assert compare_fingerprints(old, dataset_fingerprint(build_dataset("fake:20"))) == []


def test_fingerprint_labels_hash_is_little_endian_int64():
    import hashlib

    ds = build_dataset("fake:10")
    expected = hashlib.sha256(ds.labels.astype("<i8").tobytes()).hexdigest()
    assert dataset_fingerprint(ds)["labels_sha256"] == expected


def test_pickle_round_trip(tmp_path):
    _png_tree(tmp_path, "train")
    for spec in ("digits", "fake:10", f"imagefolder:{tmp_path}:8"):
        ds = build_dataset(spec)
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds)
        assert clone.spec == spec
        assert np.array_equal(clone.labels, ds.labels)
        assert torch.equal(clone[len(ds) - 1][0], ds[len(ds) - 1][0])


def test_dataloader_spawn_worker():
    ds = build_dataset("digits", split="test")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=90, num_workers=1, multiprocessing_context="spawn"
    )
    xs, ys = zip(*loader, strict=False)
    assert torch.equal(torch.cat(ys), torch.from_numpy(ds.labels))
    assert torch.equal(torch.cat(xs)[17], ds[17][0])


def test_synthetic_images_are_cheap_deterministic_and_distinct():
    train = build_dataset("synthetic:130:16:7")
    test = build_dataset("synthetic:130:16:7", split="test")
    assert (len(train), len(test), train.num_classes, train.in_channels) == (130, 26, 7, 3)
    first, label = train[65]
    assert first.shape == (3, 16, 16)
    assert first.dtype == torch.float32
    assert torch.equal(first, train[65][0])
    assert label == int(train.labels[65])
    assert not torch.equal(train[1][0], train[65][0])  # same bank image, rolled differently
    assert not torch.equal(train[0][0], test[0][0])
    assert set(train.labels) <= set(range(7))


def test_digits_upscaled_keeps_samples_and_labels():
    small, large = build_dataset("digits"), build_dataset("digits:32", split="train")
    assert large[3][0].shape == (1, 32, 32)
    assert len(large) == len(small)
    assert np.array_equal(large.labels, small.labels)
    # Bilinear upscaling keeps each digit's mean brightness.
    assert abs(float(large[3][0].mean()) - float(small[3][0].mean())) < 0.02
    with pytest.raises(SpecError, match="digits:SIZE"):
        build_dataset("digits:4")


def test_digits_subset_keeps_a_stratified_training_subset_and_the_whole_test_split():
    full, few = build_dataset("digits:16"), build_dataset("digits:16:200")
    assert len(few) == 200
    assert np.array_equal(np.bincount(few.labels), [20] * 10)
    assert len(build_dataset("digits:16:200", split="test")) == 360
    # Every kept sample is one of the full split's, unchanged.
    full_images = {full[i][0].numpy().tobytes(): full.labels[i] for i in range(len(full))}
    assert all(full_images[few[i][0].numpy().tobytes()] == few.labels[i] for i in range(0, 200, 7))


def test_digits_shift_moves_each_image_by_a_fixed_offset_within_the_bound():
    centred, moved = build_dataset("digits:16:1437"), build_dataset("digits:16:1437:2")
    assert np.array_equal(centred.labels, moved.labels)
    offsets = set()
    for i in range(0, len(centred), 97):
        x, y = centred[i][0], moved[i][0]
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(padded[:, 2 - dy : 18 - dy, 2 - dx : 18 - dx], y)
        ]
        assert found, f"sample {i} is not the centred image moved by at most 2 px"
        offsets.add(found[0])
    assert len(offsets) > 5  # offsets differ between samples
    # The test split is moved too (same distribution), and the same on every build.
    test, centred_test = (
        build_dataset("digits:16:1437:2", split="test"),
        build_dataset("digits:16", split="test"),
    )
    assert sum(not torch.equal(test[i][0], centred_test[i][0]) for i in range(20)) > 10
    assert torch.equal(test[7][0], build_dataset("digits:16:1437:2", split="test")[7][0])


@pytest.mark.parametrize(
    "spec", ["digits::300", "digits:16:5", "digits:16:1430", "digits:16:x", "digits:16:300:8"]
)
def test_malformed_digits_variants_name_the_valid_forms(spec):
    with pytest.raises(SpecError, match="digits:SIZE:N:SHIFT"):
        build_dataset(spec)
