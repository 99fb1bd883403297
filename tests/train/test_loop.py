"""train and distill on digits with real models, stores and run folders."""

from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_png, start_cli
from PIL import Image

from kdcache import DistillConfig, DumpConfig, TrainConfig
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError, KdcacheError, StoreCorruptError, StoreMismatchError
from kdcache.store.read.reader import open_store
from kdcache.train.loop import distill, train


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_train_writes_the_run_folder(tmp_path):
    result = train(TrainConfig(model="mlp:16", out=str(tmp_path / "run"), epochs=2, seed=3))
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"train_loss", "val_acc"} <= lines[0].keys()
    assert result.final == lines[-1]["val_acc"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "mlp:16"
    assert config["seed"] == 3
    assert config["resolved"]["device"] == "cpu"
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["model"] == "mlp:16"
    assert checkpoint["val_acc"] == result.best
    assert_png(run / "curves.png")
    assert not (run / "distributions.png").exists()


def test_a_finished_run_is_not_clobbered(tmp_path):
    train(TrainConfig(model="mlp:8", out=str(tmp_path), epochs=1))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(KdcacheError, match="--overwrite"):
        train(TrainConfig(model="mlp:8", out=str(tmp_path), epochs=1, seed=1))
    assert (tmp_path / "last.pt").read_bytes() == before


def test_cached_and_online_distillation_give_bit_identical_students(
    tmp_path, digits_teacher, digits_store
):
    common: dict[str, Any] = dict(
        student="mlp:16", epochs=2, batch_size=32, seed=7, device="cpu", temperature=3.0, alpha=0.6
    )
    distill(DistillConfig(cache=str(digits_store), out=str(tmp_path / "cached"), **common))
    distill(
        DistillConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            dataset="digits",
            out=str(tmp_path / "online"),
            **common,
        )
    )
    cached, online = (
        load_state(tmp_path / "cached/last.pt"),
        load_state(tmp_path / "online/last.pt"),
    )
    assert cached.keys() == online.keys()
    for name in cached:
        assert torch.equal(cached[name], online[name]), name


def test_distill_shares_an_open_store_and_draws_its_figures(tmp_path, digits_store):
    moved = tmp_path / "moved.zarr"
    digits_store.rename(moved)
    try:
        reader = open_store(moved)
        reader.load()
    finally:
        moved.rename(digits_store)
    # The store's files are gone from `moved`: the run can only use the reader's decoded copy.
    config = DistillConfig(
        student="mlp:8", cache=str(moved), epochs=1, out=str(tmp_path / "run"), device="cpu"
    )
    assert 0 <= distill(config, reader=reader).final <= 100
    assert_png(tmp_path / "run/curves.png")
    assert_png(tmp_path / "run/distributions.png")
    with pytest.raises(ConfigError, match=r"config.cache is None"):
        distill(
            DistillConfig(
                student="mlp:8", teacher="cnn:8", dataset="digits", out=str(tmp_path / "x")
            ),
            reader=reader,
        )


@pytest.mark.parametrize("loss", ["kd", "focal", "attention"])
def test_every_loss_distills_from_the_cache(tmp_path, digits_store, loss):
    result = distill(
        DistillConfig(
            student="mlp:16",
            cache=str(digits_store),
            loss=loss,
            epochs=1,
            out=str(tmp_path),
            top_k=3,
        )
    )
    assert 0 <= result.final <= 100
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["dataset"] == "digits"


def test_a_store_from_another_dataset_is_refused(tmp_path, digits_store):
    with pytest.raises(StoreMismatchError, match="1437 samples"):
        distill(
            DistillConfig(
                student="mlp:8", cache=str(digits_store), dataset="fake:50", out=str(tmp_path)
            )
        )
    with pytest.raises(StoreMismatchError, match=r"1437 samples.*360"):
        distill(
            DistillConfig(student="mlp:8", cache=str(digits_store), split="test", out=str(tmp_path))
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"batch_size": 0}, "--batch-size must be an integer from 1"),
        ({"loss": "mse"}, "kd, focal, attention"),
        ({"cache": None}, "--cache"),
        ({"cache_memory": "lots"}, "'lots'.*8GiB"),
        (
            {"cache": None, "teacher": "cnn", "dataset": "digits", "cache_memory": "1GB"},
            "--cache-memory only applies",
        ),
    ],
)
def test_invalid_distill_options(changes, message):
    options = {"student": "mlp", "cache": "s.zarr", "out": "run", **changes}
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**options)


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, digits_teacher):
    from kdcache import DumpConfig
    from kdcache.dump.teacher import dump_teacher

    store = tmp_path_factory.mktemp("topk") / "top4.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            out=str(store),
            encoding="topk:4",
            device="cpu",
        )
    )
    return store


@pytest.mark.parametrize("loss", ["kd", "focal", "attention"])
def test_every_loss_distills_from_a_topk_store(tmp_path, topk_store, loss):
    result = distill(
        DistillConfig(
            student="mlp:16",
            cache=str(topk_store),
            loss=loss,
            epochs=1,
            top_k=4,
            temperature=2.5,
            out=str(tmp_path / "run"),
        )
    )
    assert 0 <= result.final <= 100
    assert (
        json.loads((tmp_path / "run/config.json").read_text())["resolved"]["store"]["encoding"]
        == "topk:4"
    )


def test_concurrent_distill_runs_read_one_store(tmp_path, digits_store):
    before = {p: p.read_bytes() for p in digits_store.rglob("*") if p.is_file()}
    runs = [
        start_cli(
            "distill",
            "--student",
            "mlp:8",
            "--cache",
            str(digits_store),
            "--epochs",
            "1",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / f"run{i}"),
        )
        for i in range(2)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
    first, second = load_state(tmp_path / "run0/last.pt"), load_state(tmp_path / "run1/last.pt")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert {p: p.read_bytes() for p in digits_store.rglob("*") if p.is_file()} == before
    assert open_store(digits_store).group.store.read_only


def _image_folder(root, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for label in ("ant", "bee"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return f"imagefolder:{root}:8"


def test_a_store_dumped_from_a_relative_image_folder_distills_from_any_folder(
    tmp_path, monkeypatch
):
    _image_folder(tmp_path / "work" / "images")
    monkeypatch.chdir(tmp_path / "work")
    dump_teacher(
        DumpConfig(teacher="cnn:4", dataset="imagefolder:images:8", out="s.zarr", device="cpu")
    )
    recorded = open_store("s.zarr").metadata.dataset or {}
    assert recorded["spec"] == f"imagefolder:{tmp_path / 'work' / 'images'}:8"
    monkeypatch.chdir(tmp_path)
    result = distill(
        DistillConfig(student="mlp:8", cache="work/s.zarr", epochs=1, out=str(tmp_path / "run"))
    )
    assert result.final is not None
    assert (tmp_path / "run" / "last.pt").is_file()


def test_fingerprint_refusals_say_which_part_differs(tmp_path):
    spec = _image_folder(tmp_path / "images")
    dump_teacher(
        DumpConfig(teacher="cnn:4", dataset=spec, out=str(tmp_path / "s.zarr"), device="cpu")
    )
    # Same files and labels, one image's pixels changed.
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images/train/ant/0.png")
    config = DistillConfig(
        student="mlp:8", cache=str(tmp_path / "s.zarr"), epochs=1, out=str(tmp_path / "run")
    )
    with pytest.raises(StoreMismatchError, match="inputs differ at the sampled indices") as refused:
        distill(config)
    assert "labels differ" not in str(refused.value)
    assert not (tmp_path / "run" / "last.pt").exists()

    dump_teacher(
        DumpConfig(
            teacher="cnn:4", dataset="fake:40:8:10", out=str(tmp_path / "f.zarr"), device="cpu"
        )
    )
    with pytest.raises(StoreMismatchError, match=r"labels differ \(sha256 .*inputs differ"):
        distill(
            DistillConfig(
                student="mlp:8",
                cache=str(tmp_path / "f.zarr"),
                dataset="fake:40:16:10",
                epochs=1,
                out=str(tmp_path / "run"),
            )
        )


def test_distill_stops_at_a_corrupted_chunk_naming_its_samples(tmp_path, digits_store):
    store = tmp_path / "s.zarr"
    shutil.copytree(digits_store, store)
    chunk = next(p for p in sorted((store / "logits" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    rows = open_store(store).metadata.chunk_rows
    with pytest.raises(
        StoreCorruptError, match=f"corrupted for samples 0-{min(rows, 1437) - 1} .*kdcache verify"
    ):
        distill(
            DistillConfig(student="mlp:8", cache=str(store), epochs=1, out=str(tmp_path / "run"))
        )
    assert not (tmp_path / "run" / "last.pt").exists()


def test_evaluations_within_epochs_are_recorded_and_change_no_weight(tmp_path):
    """--eval-every N evaluates at every N-th step of the run inside epochs (each epoch's end
    once, as before). A student with dropout and batch norm trains bit for bit as without it (the
    evaluations' random draws are put back, train mode restored), and best is the best
    evaluation, wherever it fell."""
    common: dict[str, Any] = dict(model="teachers:dropout", epochs=2, batch_size=128, seed=5)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **common))
    every = train(TrainConfig(out=str(tmp_path / "every"), eval_every=4, **common))
    steps = -(-len(build_dataset("digits", split="train")) // 128)
    assert steps % 4 == 0  # an epoch's end is also an N-th step: evaluated once
    records = [
        json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(4, 2 * steps + 1, 4))
    ends = [r for r in records if "epoch_progress" not in r]
    assert [(r["epoch"], r["step"]) for r in ends] == [(1, steps), (2, 2 * steps)]
    within = [r for r in records if "epoch_progress" in r]
    assert [r["epoch_progress"] for r in within] == pytest.approx(
        [r["step"] / steps for r in within]
    )
    times = [r["train_time_s"] for r in records[: steps // 4]]  # the first epoch's
    assert times == sorted(times)
    plain_records = [
        json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    ]
    for end, before in zip(ends, plain_records, strict=True):
        assert (end["train_loss"], end["val_acc"], end["lr"]) == (
            before["train_loss"],
            before["val_acc"],
            before["lr"],
        )
    a, b = (load_state(tmp_path / run / "last.pt") for run in ("plain", "every"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = max(records, key=lambda r: r["val_acc"])
    assert (every.best, every.best_step) == (best["val_acc"], best["step"])
    assert plain.best_step == plain.best_epoch * steps
    checkpoint = torch.load(tmp_path / "every" / "best.pt", weights_only=True)
    assert (checkpoint["val_acc"], checkpoint["step"]) == (every.best, every.best_step)
    assert_png(tmp_path / "every" / "curves.png")


def test_eval_every_must_be_a_whole_number_of_steps():
    with pytest.raises(ConfigError, match=r"--eval-every must be an integer from 0 to .*, got -1"):
        TrainConfig(model="mlp:8", out="run", eval_every=-1)


def test_a_batch_norm_student_refuses_batches_of_one_in_one_line(tmp_path):
    config = TrainConfig(
        model="teachers:dropout", dataset="fake:21:8:4", batch_size=1, out=str(tmp_path / "run")
    )
    with pytest.raises(ConfigError, match=r"batch of one sample.*--batch-size 2 or more"):
        train(config)


def test_accumulated_batches_step_as_one_batch_that_large(tmp_path):
    """3 batches of 8 accumulated, and batches of 24, on 44 samples: the same 2 steps an epoch
    (the second of 8, 8 and 4 samples, each weighed by its share), learning rates, losses and
    weights, up to the order in which float sums add up. SGD, whose step follows the
    gradient's scale (Adam's would hide a wrong one)."""
    common: dict[str, Any] = dict(
        model="mlp:8", dataset="fake:44:8", epochs=2, optimizer="sgd", lr=0.5, warmup_epochs=0.5
    )
    runs: dict[str, dict[str, Any]] = {
        "large": dict(batch_size=24),
        "accumulated": dict(batch_size=8, grad_accum_steps=3),
    }
    for name, options in runs.items():
        train(TrainConfig(out=str(tmp_path / name), **options, **common))
    records = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in runs
    }
    assert [record["step"] for record in records["accumulated"]] == [2, 4]
    for large, accumulated in zip(records["large"], records["accumulated"], strict=True):
        assert (accumulated["step"], accumulated["lr"]) == (large["step"], large["lr"])
        assert accumulated["train_loss"] == pytest.approx(large["train_loss"], rel=1e-6)
    large, accumulated = (load_state(tmp_path / name / "last.pt") for name in runs)
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-5, atol=1e-6)
    train(TrainConfig(out=str(tmp_path / "small"), batch_size=8, **common))
    small = load_state(tmp_path / "small" / "last.pt")
    assert not all(torch.allclose(accumulated[key], small[key]) for key in small)
