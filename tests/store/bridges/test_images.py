"""TinyViT's keys.txt/values.bin top-k files and FKD's soft-label files imported into image stores.

The synthetic files are written as the peers' code writes them: TinyViT's DatasetWrapper and
TxtManager (microsoft/Cream TinyViT/data/augmentation/dataset_wrapper.py, manager.py: per key
int32 seed + k int16 ids + k float16 probabilities, rank{r}-keys.txt / rank{r}-values.bin in
logits_top{k}_epoch{e}); FKD's generate_soft_label.py (szq0214/FKD FKD_SLG/: torch.save of
[coords (N, 4), flip_status (N,), output (N, 2, k)] per image, under the image's last three
folders).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from narrowing import present

from kdcache import open_store
from kdcache.augment.recipe import parse_recipe
from kdcache.errors import ConfigError, SpecError
from kdcache.store.bridges.fkd import FIELDS, RECIPE, import_fkd
from kdcache.store.bridges.tinyvit import SEED_ARRAY, import_tinyvit
from kdcache.store.tools.verify import verify_store

CLASSES, K = 20, 3


def probabilities(sample: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-3 ids and probabilities that name the sample: its top class is sample % 10."""
    return np.array([sample % 10, 10 + sample % 5, 17]), np.array([0.6, 0.25, 0.1])


def write_tinyvit(folder, keys_by_rank: dict[int, list[str]], index_of) -> None:
    folder.mkdir(parents=True)
    for rank, keys in keys_by_rank.items():
        (folder / f"rank{rank}-keys.txt").write_text("".join(key + "\n" for key in keys))
        with (folder / f"rank{rank}-values.bin").open("wb") as values:
            for key in keys:
                ids, probs = probabilities(index_of(key))
                values.write(np.int32(1000 + index_of(key) + rank).tobytes())
                values.write(ids.astype(np.int16).tobytes() + probs.astype(np.float16).tobytes())


def test_a_tinyvit_epoch_imports_by_sample_index_with_its_seeds(tmp_path):
    folder = tmp_path / "logits" / f"logits_top{K}_epoch2"
    # Rank 1 also wrote sample 2 (a padded sampler): TinyViT reads rank 0's, and so does kdcache.
    write_tinyvit(folder, {0: ["0", "2", "4"], 1: ["1", "3", "2", "5"]}, int)
    result = import_tinyvit(folder, tmp_path / "tv.zarr", num_classes=CLASSES)
    assert (result.num_samples, result.k, result.encoding) == (6, K, "topk:3")
    store = open_store(tmp_path / "tv.zarr")
    assert verify_store(tmp_path / "tv.zarr").ok
    rows = store.read_sparse(np.arange(6))
    top, tail = rows.log_probs(1.0)
    for sample in range(6):
        ids, probs = probabilities(sample)
        assert rows.indices[sample].tolist() == ids.tolist()
        np.testing.assert_allclose(top[sample].exp().numpy(), probs, atol=2e-3)
    np.testing.assert_allclose(tail.exp().numpy(), 0.05, atol=2e-3)
    seeds = store.guard.whole(SEED_ARRAY)
    assert seeds.tolist() == [1000, 1002, 1002, 1004, 1004, 1006]
    assert store.metadata.extra["imported_from"]["epoch"] == 2


def test_tinyvit_keys_are_looked_up_and_a_missing_sample_is_named(tmp_path):
    names = ["n01/a.jpg", "n01/b.jpg", "n02/c.jpg"]
    folder = tmp_path / f"logits_top{K}_epoch0"
    write_tinyvit(folder, {0: ["n02/c.jpg", "n01/a.jpg"]}, names.index)
    with pytest.raises(ConfigError, match="not sample indices; pass --keys"):
        import_tinyvit(folder, tmp_path / "a.zarr", num_classes=CLASSES)
    with pytest.raises(SpecError, match=r"no logits for samples 1;"):
        import_tinyvit(folder, tmp_path / "b.zarr", num_classes=CLASSES, keys=names)
    assert not (tmp_path / "b.zarr").exists()


def write_fkd(root, images: dict[str, int], crops: int = 4) -> None:
    """One FKD file per image path ``class/stem`` under root/imagenet/train/."""
    generator = np.random.default_rng(0)
    for number, (name, sample) in enumerate(images.items()):
        path = root / "imagenet" / "train" / f"{name}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        coords = generator.uniform(0, 0.5, size=(crops, 4)).astype(np.float32)
        flips = np.array([crop % 2 == number % 2 for crop in range(crops)])
        output = np.stack(
            [
                np.stack(
                    [
                        probabilities(sample * crops + crop)[0],
                        probabilities(sample * crops + crop)[1],
                    ]
                )
                for crop in range(crops)
            ]
        ).astype(np.float32)
        torch.save([coords, flips, output], path)


def test_fkd_files_import_as_one_view_per_crop(tmp_path):
    images = {"n02/x": 2, "n01/b": 1, "n01/a": 0}  # samples in ImageFolder's sorted order
    write_fkd(tmp_path / "labels", images)
    result = import_fkd(
        tmp_path / "labels",
        tmp_path / "fkd.zarr",
        num_classes=CLASSES,
        input_size=8,
        classes=["n01", "n02", *(f"other{number}" for number in range(CLASSES - 2))],
    )
    assert (result.num_samples, result.views, result.k) == (3, 4, K)
    store = open_store(tmp_path / "fkd.zarr")
    assert verify_store(tmp_path / "fkd.zarr").ok
    assert present(store.labels).tolist() == [0, 0, 1]  # class folders n01, n01, n02
    recipe = parse_recipe(RECIPE)
    assert (recipe.spec, list(recipe.fields)) == (RECIPE, FIELDS)
    assert present(store.metadata.augment)["fields"] == FIELDS
    rows = store.read_sparse(np.arange(12))
    top, _ = rows.log_probs(1.0)
    for row in range(12):
        ids, probs = probabilities(row)
        assert rows.indices[row].tolist() == ids.tolist()
        np.testing.assert_allclose(top[row].exp().numpy(), probs, atol=2e-3)
    params = present(store.view_params)
    assert params.shape == (3, 4, 5)
    assert set(np.unique(params[:, :, 4]).tolist()) == {0.0, 1.0}
    # Sample 0 is n01/a: its boxes, fractions of the image, are now pixel boxes of 8 x 8.
    path = tmp_path / "labels" / "imagenet" / "train" / "n01" / "a.tar"
    coords = torch.load(path, weights_only=False)[0] * 8
    expected = np.rint(coords)
    expected[:, 2:] = np.maximum(expected[:, 2:], 1)
    np.testing.assert_array_equal(params[0, :, :4], expected)


def test_fkd_labels_need_every_class_folder_or_the_class_list(tmp_path):
    write_fkd(tmp_path / "labels", {"n03/c": 1, "n01/a": 0})  # no n00, n02, ... folder
    with pytest.raises(ConfigError, match="2 class folders but --num-classes is 20"):
        import_fkd(tmp_path / "labels", tmp_path / "a.zarr", num_classes=CLASSES, input_size=8)
    assert not (tmp_path / "a.zarr").exists()
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"n{number:02d}\n" for number in range(CLASSES)))
    options = ["--num-classes", str(CLASSES), "--input-size", "8", "--out"]
    run_cli(
        "import", "fkd", str(tmp_path / "labels"), *options, str(tmp_path / "b.zarr"),
        "--classes", str(classes),
    )  # fmt: skip
    store = open_store(tmp_path / "b.zarr")
    assert present(store.labels).tolist() == [1, 3]  # n01/a, n03/c: their lines in the list
    assert present(store.metadata.dataset)["class_names"][3] == "n03"
    classes.write_text("n01\nn02\n")
    refused = run_cli(
        "import", "fkd", str(tmp_path / "labels"), *options, str(tmp_path / "c.zarr"),
        "--classes", str(classes), check=False,
    )  # fmt: skip
    assert_one_line_error(refused, "--classes lists 2 class folders")


def test_fkd_refuses_other_label_types_in_one_line(tmp_path):
    path = tmp_path / "labels" / "a" / "b" / "c" / "x.tar"
    path.parent.mkdir(parents=True)
    torch.save([np.zeros((2, 4), np.float32), np.zeros(2, bool), np.zeros(2, np.float32)], path)
    refused = run_cli(
        "import",
        "fkd",
        str(tmp_path / "labels"),
        "--num-classes",
        "10",
        "--input-size",
        "8",
        "--out",
        str(tmp_path / "out.zarr"),
        check=False,
    )
    assert_one_line_error(refused, "hard and smoothing labels keep no distribution")
    assert not (tmp_path / "out.zarr").exists()
