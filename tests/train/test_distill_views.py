"""Distillation from stores with augmented views: consistency, cached == online, refusals."""

from __future__ import annotations

import json
import logging
import re
import shutil
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_one_line_error, assert_png, run_cli
from narrowing import kdcache_record, present, stored, zarr_array
from older_stores import as_previous_release
from teachers import seeded

from kdcache import DistillConfig, DumpConfig, TrainConfig
from kdcache.augment.recipe import parse_recipe
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import (
    ConfigError,
    SpecError,
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from kdcache.store.read.reader import open_store
from kdcache.store.tools.verify import verify_store
from kdcache.train.loop import distill, train

RECIPE = "pad-crop:1+flip+mixup:0.4"
DATASET = "fake:48:8:4"  # 48 train, 9 test images of (3, 8, 8): a tiny but real image set
TEACHER = "teachers:seeded"  # cnn:8 from a fixed seed, identical in every process


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def dump_views(out, **changes):
    options: dict[str, Any] = dict(
        teacher=TEACHER,
        dataset=DATASET,
        out=str(out),
        encoding="float32",
        views=3,
        augment=RECIPE,
        augment_seed=2,
        batch_size=30,
        chunk_rows=12,
        device="cpu",
    )
    return dump_teacher(DumpConfig(**{**options, **changes}))


@pytest.fixture(scope="module")
def view_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("views") / "views.zarr"
    dump_views(out)
    return out


def test_the_dump_stores_the_teachers_logits_on_each_recreated_view(view_store):
    reader = open_store(view_store)
    assert reader.views == 3
    assert present(reader.metadata.augment)["recipe"] == RECIPE
    assert present(reader.metadata.augment)["seed"] == 2
    assert present(reader.metadata.augment)["input_size"] == [8, 8]
    assert present(reader.metadata.augment)["sampler"] == "counter-v1"
    dataset = build_dataset(DATASET)
    recipe = parse_recipe(RECIPE)
    logits, params = reader.read_views([5, 40])
    # The stored parameters are the recipe's draw; replaying them gives the teacher's logits.
    teacher = seeded(num_classes=4, in_channels=3).eval()
    for row, sample in enumerate([5, 40]):
        for view in range(3):
            record = recipe.sample(seed=2, index=sample, view=view, num_samples=48, size=(8, 8))
            np.testing.assert_array_equal(present(params)[row, view], record)
            partner = dataset[present(recipe.partner(record))][0]
            image = recipe.apply(dataset[sample][0], record, partner)
            with torch.no_grad():
                expected = teacher(image[None])[0]
            torch.testing.assert_close(logits[row, view], expected, rtol=1e-5, atol=1e-5)


def test_an_interrupted_dump_with_views_resumes_bit_identical(tmp_path, view_store):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(view_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    zarr_array(group, "chunk_written")[5:] = 0  # as if killed after the first five chunks
    group.attrs["kdcache"] = {**kdcache_record(group), "complete": False}
    zarr_array(group, "logits")[60:] = 0
    assert dump_views(copy, resume=True).rows_computed == 144 - 60
    assert verify_store(copy).ok
    before = stored(zarr.open_group(str(view_store), mode="r"), "logits")
    assert np.array_equal(stored(zarr.open_group(str(copy), mode="r"), "logits"), before)


def test_cached_and_online_distillation_with_views_give_bit_identical_students(
    tmp_path, view_store
):
    common: dict[str, Any] = dict(
        student="mlp:16", epochs=2, batch_size=8, seed=7, device="cpu", temperature=3.0, alpha=0.6
    )
    distill(DistillConfig(cache=str(view_store), out=str(tmp_path / "cached"), **common))
    online: dict[str, Any] = dict(teacher=TEACHER, dataset=DATASET, **common)
    distill(
        DistillConfig(
            augment=RECIPE, augment_seed=2, views=3, out=str(tmp_path / "online"), **online
        )
    )
    cached, same = load_state(tmp_path / "cached/last.pt"), load_state(tmp_path / "online/last.pt")
    assert cached.keys() == same.keys()
    for name in cached:
        assert torch.equal(cached[name], same[name]), name
    # Other views (another seed) give another student: the test can fail.
    distill(
        DistillConfig(
            augment=RECIPE, augment_seed=3, views=3, out=str(tmp_path / "other"), **online
        )
    )
    other = load_state(tmp_path / "other/last.pt")
    assert not all(torch.equal(cached[name], other[name]) for name in cached)
    resolved = json.loads((tmp_path / "cached/config.json").read_text())["resolved"]
    assert resolved["views"] == 3
    assert resolved["store"]["augment"]["recipe"] == RECIPE
    online_resolved = json.loads((tmp_path / "online/config.json").read_text())["resolved"]
    assert resolved["view_sampler"] == online_resolved["view_sampler"] == "counter-v1"


#: Every operation of view-parameter layout 2, with one mixing operation.
COLOUR_RECIPE = (
    "pad-crop:1+flip+jitter:0.4,0.4,0.4,0.1+gray:0.5+blur:3,p=0.5+randaugment:2,9+trivialaugment"
    "+autoaugment+erase:0.5,value=random+cutmix:1"
)


def test_colour_policy_and_erasing_views_give_bit_identical_students_cached_and_online(tmp_path):
    store = tmp_path / "colour.zarr"
    dump_views(store, augment=COLOUR_RECIPE)
    assert verify_store(store).ok
    assert present(open_store(store).metadata.augment)["ops_version"] == 2
    common: dict[str, Any] = dict(
        student="mlp:16", epochs=2, batch_size=8, seed=7, device="cpu", temperature=3.0, alpha=0.6
    )
    distill(DistillConfig(cache=str(store), out=str(tmp_path / "cached"), **common))
    online: dict[str, Any] = dict(teacher=TEACHER, dataset=DATASET, views=3, **common)
    distill(
        DistillConfig(augment=COLOUR_RECIPE, augment_seed=2, out=str(tmp_path / "online"), **online)
    )
    cached, same = load_state(tmp_path / "cached/last.pt"), load_state(tmp_path / "online/last.pt")
    for name in cached:
        assert torch.equal(cached[name], same[name]), name
    # The colour operations change the views: without them the student differs.
    plain = COLOUR_RECIPE.replace("+jitter:0.4,0.4,0.4,0.1+gray:0.5", "")
    distill(DistillConfig(augment=plain, augment_seed=2, out=str(tmp_path / "plain"), **online))
    other = load_state(tmp_path / "plain/last.pt")
    assert not all(torch.equal(cached[name], other[name]) for name in cached)


def test_a_store_drawn_by_the_older_generator_distills_from_its_stored_views(tmp_path):
    # A store as kdcache wrote it before counter-v1: no augment.sampler. Its stored views are
    # what counts. Here they are counter-v1's views of seed 5 while the record says seed 2: a
    # cached run that redrew the views from the record would not match the online run on seed 5.
    legacy = tmp_path / "legacy.zarr"
    dump_views(legacy, augment_seed=5)
    record = kdcache_record(zarr.open_group(str(legacy), mode="r"))
    augment = {k: v for k, v in record["augment"].items() if k != "sampler"}
    as_previous_release(legacy, augment={**augment, "seed": 2})
    group = zarr.open_group(str(legacy), mode="r+")
    common: dict[str, Any] = dict(student="mlp:16", epochs=1, batch_size=8, seed=7, device="cpu")
    distill(DistillConfig(cache=str(legacy), out=str(tmp_path / "cached"), **common))
    online: dict[str, Any] = dict(
        teacher=TEACHER, dataset=DATASET, augment=RECIPE, augment_seed=5, views=3
    )
    distill(DistillConfig(out=str(tmp_path / "online"), **online, **common))
    cached, same = load_state(tmp_path / "cached/last.pt"), load_state(tmp_path / "online/last.pt")
    for name in cached:
        assert torch.equal(cached[name], same[name]), name
    resolved = json.loads((tmp_path / "cached/config.json").read_text())["resolved"]
    assert resolved["view_sampler"] == "numpy-default_rng"
    # Claiming the online run's views is refused: another generator drew these.
    with pytest.raises(
        StoreMismatchError,
        match="drawn by the generator 'numpy-default_rng' but --augment/--augment-seed draw "
        "them with 'counter-v1'",
    ):
        distill(DistillConfig(cache=str(legacy), augment=RECIPE, out=str(tmp_path / "x"), **common))
    # Its missing views would be drawn differently: a resume is refused in one line.
    zarr_array(group, "chunk_written")[5:] = 0
    group.attrs["kdcache"] = {**kdcache_record(group), "complete": False}
    with pytest.raises(StoreMismatchError, match="drawn by an older kdcache's generator"):
        dump_views(legacy, resume=True)


def test_a_seed_edited_in_the_metadata_before_resume_is_refused(tmp_path, view_store):
    # Resuming with --augment-seed 7 after editing the record to say 7 would mix two seeds'
    # views in one store: the record no longer matches the digest it was written with.
    copy = tmp_path / "copy.zarr"
    shutil.copytree(view_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    zarr_array(group, "chunk_written")[5:] = 0
    record = kdcache_record(group)
    group.attrs["kdcache"] = {
        **record,
        "complete": False,
        "augment": {**record["augment"], "seed": 7},
    }
    with pytest.raises(StoreFormatError, match="metadata edited since it was written"):
        dump_views(copy, resume=True, augment_seed=7)
    assert np.array_equal(
        stored(group, "view_params"), stored(zarr.open_group(str(view_store)), "view_params")
    )


def test_a_flipped_byte_in_view_params_is_one_line_in_distill(tmp_path, view_store):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(view_store, copy)
    chunk = next(p for p in (copy / "view_params" / "c").rglob("*") if p.is_file())
    content = bytearray(chunk.read_bytes())
    content[len(content) // 3] ^= 0x10
    chunk.write_bytes(bytes(content))
    result = run_cli(
        "distill",
        "--student",
        "mlp:8",
        "--cache",
        str(copy),
        "--dataset",
        DATASET,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        check=False,
    )
    assert_one_line_error(result, "view_params", "does not decode")


def test_out_of_range_views_of_an_older_store_are_refused_naming_sample_and_view(
    tmp_path, view_store
):
    # A store as the previous release wrote it has no digest over view_params: the range
    # checks alone stand between an edited record and a student trained on blank views.
    copy = tmp_path / "copy.zarr"
    shutil.copytree(view_store, copy)
    as_previous_release(copy)
    group = zarr.open_group(str(copy), mode="r+")
    params = stored(group, "view_params")
    fields = kdcache_record(group)["augment"]["fields"]
    for field, value, expected in [
        ("pad_top", 1000, "pad_top = 1000, expected an integer from 0 to 2"),
        ("partner", -1, "partner = -1, expected another sample's index in [0, 48)"),
        ("lam", 5, "lam = 5, expected from 0 to 1"),
    ]:
        edited = params.copy()
        edited[9, 2, fields.index(field)] = value
        zarr_array(group, "view_params")[:] = edited
        with pytest.raises(
            StoreCorruptError, match="view 2 of sample 9 has " + re.escape(expected)
        ):
            distill(
                DistillConfig(student="mlp:8", cache=str(copy), out=str(tmp_path / "r"), epochs=1)
            )
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"augment": "pad-crop:2+flip"}, "dumped with recipe 'pad-crop:1\\+flip\\+mixup:0.4'"),
        ({"augment_seed": 5}, "--augment-seed 2 but 5"),
        ({"views": 4}, "holds 3 views per sample but --views 4"),
    ],
)
def test_a_store_dumped_with_other_views_is_refused(tmp_path, view_store, changes, message):
    with pytest.raises(StoreMismatchError, match=message):
        distill(
            DistillConfig(
                student="mlp:8", cache=str(view_store), out=str(tmp_path), epochs=1, **changes
            )
        )


def test_student_only_augmentation_warns_that_it_breaks_consistency(tmp_path, caplog):
    dump_teacher(DumpConfig(teacher=TEACHER, dataset=DATASET, out=str(tmp_path / "clean.zarr")))
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        result = distill(
            DistillConfig(
                student="mlp:8",
                cache=str(tmp_path / "clean.zarr"),
                student_augment="pad-crop:1+flip",
                out=str(tmp_path / "run"),
                epochs=1,
                device="cpu",
            )
        )
    assert 0 <= result.final <= 100
    assert "no longer see the same view" in caplog.text


def test_the_command_line_prefixes_the_warning(tmp_path, digits_store):
    result = run_cli(
        "-q",
        "distill",
        "--student",
        "mlp:8",
        "--cache",
        str(digits_store),
        "--student-augment",
        "pad-crop:1+flip",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    )
    assert result.stderr.startswith("Warning: --student-augment pad-crop:1+flip changes the ")


def test_train_with_augmentation_draws_a_fresh_view_each_epoch(tmp_path):
    result = train(
        TrainConfig(
            model="mlp:8",
            dataset=DATASET,
            out=str(tmp_path),
            epochs=2,
            augment="pad-crop:1+cutmix:1",
            seed=1,
        )
    )
    assert 0 <= result.final <= 100
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["views"] == 2


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (lambda: DumpConfig(teacher="cnn", views=4), ConfigError, "--views 4 needs --augment"),
        (lambda: DumpConfig(teacher="cnn", augment="sharpen"), SpecError, "unknown operation"),
        (
            lambda: DistillConfig(
                student="mlp", cache="s.zarr", out="r", student_augment="mixup:1"
            ),
            ConfigError,
            "cannot mix samples",
        ),
        (
            lambda: DistillConfig(student="mlp", teacher="cnn", dataset="digits", out="r", views=2),
            ConfigError,
            "needs --augment",
        ),
    ],
)
def test_invalid_view_options(config, error, message):
    with pytest.raises(error, match=message):
        config()


def test_cli_dumps_views_and_inspect_shows_them(tmp_path):
    out = tmp_path / "v.zarr"
    result = run_cli(
        "dump-teacher",
        "--teacher",
        TEACHER,
        "--dataset",
        DATASET,
        "--out",
        str(out),
        "--encoding",
        "topk:3",
        "--views",
        "2",
        "--augment",
        "rrc:scale=0.5-1+flip",
        "--device",
        "cpu",
    )
    assert "V=2" in result.stdout
    assert "B/view" in result.stdout
    shown = run_cli("inspect", str(out), "--plot", str(tmp_path / "store.png")).stdout
    assert "views (V):" in shown
    assert "rrc:scale=0.5-1" in shown
    assert_png(tmp_path / "store.png")
    assert_png(tmp_path / "store-views.png")  # a few samples' views with the teacher's classes
